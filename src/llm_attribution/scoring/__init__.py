"""One scoring engine: features of a run -> every method's score matrix (in memory, streamed, resumable,
under torchrun), and the score store that keeps the matrices. HIGHER = the training example supports the
test output more."""
