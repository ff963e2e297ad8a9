"""One exception type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (spec, model id, data, flags): the message says what and where."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM: the message says how to resume; the CLI exits with `code` (128 + signal)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def hub_error(what: str, error: Exception, local: str = "give a local path") -> UserError:
    """One line for a failure to fetch `what` from the Hugging Face hub, telling apart the three causes a user fixes
    differently: no network, a gated repository (licence and login), an id that does not exist."""
    text = str(error)
    first = (text.splitlines() or [""])[0][:200]
    kind = type(error).__name__
    gated = UserError(f"{what} is gated on the Hugging Face hub: accept its licence on its hub page, then log in "
                      "(hf auth login, or set HF_TOKEN)")
    offline = UserError(f"cannot reach the Hugging Face hub for {what} (no network, or offline mode), and it is "
                        f"not in the local cache: connect once to download it, or {local}")
    missing = UserError(f"{what} does not exist on the Hugging Face hub (check the id; a private one needs a login)")
    # the hub's own error types first (a missing repository's message also mentions "gated"), then transformers'
    # and datasets' wording of them
    if kind == "GatedRepoError":
        return gated
    if kind in ("RepositoryNotFoundError", "DatasetNotFoundError", "EntryNotFoundError", "RevisionNotFoundError"):
        return gated if "gated dataset" in text.lower() else missing
    network = kind.startswith("Connect") or kind.endswith("Timeout") or kind in ("NetworkError", "ProxyError")   # httpx
    if (isinstance(error, (ConnectionError, TimeoutError)) or network
            or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
            or "couldn't connect" in text or "offline" in text.lower() or "Name or service not known" in text):
        return offline
    if "gated repo" in text.lower() or "is a gated" in text.lower():
        return gated
    if "not a valid model identifier" in text or "doesn't exist" in text or "404 Client Error" in text:
        return missing
    return UserError(f"{what}: {kind}: {first}")
