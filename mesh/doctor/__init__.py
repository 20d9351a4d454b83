"""`mesh doctor`: checks a node the way an operator would by hand, and says what is wrong."""
