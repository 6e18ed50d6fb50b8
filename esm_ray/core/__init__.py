"""Pure tensor math: one module per idea, no I/O, no Ray, no hidden state."""
