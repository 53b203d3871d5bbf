"""The run dir: what a run leaves on disk, and the code that writes and reads it."""
