"""Exceptions edge-prune raises for bad input. Each message says what was found and what to do."""


class EdgePruneError(Exception):
    """Base class: the CLI prints these as one clear line and exits with code 2."""


class RecipeError(EdgePruneError):
    """A recipe is malformed, inconsistent, or for another model."""


class ModelError(EdgePruneError):
    """A checkpoint directory is missing, unreadable, or not a supported architecture."""


class InputError(EdgePruneError):
    """A request's image or prompt cannot be processed."""


class ArtifactError(EdgePruneError):
    """A converted artifact is missing files, corrupt, or for another backend."""


class ProfileError(EdgePruneError):
    """A device profile is unknown or malformed, or a budget is out of range."""
