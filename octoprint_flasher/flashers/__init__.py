"""One module per protocol: the whole-flash algorithm (identify, write, verify, leave)."""
