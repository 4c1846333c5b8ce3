"""The book's results: the results page, figures and the 3-D viewer."""
