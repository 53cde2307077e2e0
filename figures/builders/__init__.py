"""Analysis-specific figure builders: one module per analysis, each registering itself.

Every module in this package is imported by ``figures.registry.load_builders()``; a module
declares its builders with ``@register("<analysis>")`` and needs no other wiring.

    >>> from figures.registry import register  # registers a builder  # doctest: +SKIP
    >>> @register("token_depth")  # doctest: +SKIP
    ... def figures(record): return {"kl": ...}
"""
