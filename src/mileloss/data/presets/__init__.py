"""Domain-mixture presets shipped with the package: ``pile.json`` (``mileloss data --mix pile``)."""
