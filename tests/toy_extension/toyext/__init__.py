"""A researcher's own package of clipbackdoor extensions (tests): one module per attack, defense or detector,
registered through the ``clipbackdoor.extensions`` entry-point group (tests/test_extensions.py installs it)."""
