"""Tool calling shared by the server and the offline API: the tools and tool_choice of a chat,
how they reach the prompt, the output constraint of a forced choice, and the calls read back
out of the generated text."""
