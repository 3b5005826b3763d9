"""The one exception type whose message is meant for the person chatting."""


class UserFacingError(Exception):
    """Bad input or an unavailable model, explained in words a user can act on.

    The UI shows ``str(error)`` in the chat as the assistant's reply; anything
    else that escapes is logged and replaced by a generic apology.
    """
