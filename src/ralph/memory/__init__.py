"""Memory blocks with history, and the proposals through which agents change them."""
