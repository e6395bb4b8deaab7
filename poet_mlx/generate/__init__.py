"""Text from a model: sampling replies and the chat session."""
