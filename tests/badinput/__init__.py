"""Bad-input corpus: cases in ``*.yaml`` beside this file, builders in :mod:`badinput.builders`."""
