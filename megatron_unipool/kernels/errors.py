"""The error of a kernel choice this machine cannot run (a config field set to a backend whose
package, device or dtype is missing): the user's to fix, so the launcher reports it in one line."""


class KernelUnavailableError(RuntimeError):
    pass
