"""CDI specs: model, parsing, validation, names, versions. Pure: no side effects."""

# The OCI hook stages, which are also the values a CDI hook's hookName may take. Kept here,
# in a module that imports nothing, because the CLI's hook fast path needs it too.
HOOK_STAGES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
