"""depthlens: measure how deep a language model's safety alignment goes, and repair it.

    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-llama")
    >>> model.n_layers
    2
"""

__version__ = "0.1.0"
