"""Recipes that build models from the built-in ones (today: the MiniLM movie-sentiment
classifier, :mod:`raylens.models.zoo.classifier`)."""
