"""CDI specs: model, parsing, validation, names, versions. Pure: no side effects."""
