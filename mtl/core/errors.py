"""The one exception type that reaches the user as a clear message (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a data set. The CLI prints it in one line, exit 2."""


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says that memory ran out: MemoryError, torch's CPU allocator or CUDA, also as re-raised from a
    DataLoader worker."""
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "CUDA out of memory" in text
