from functools import wraps

from django.conf import settings
from django.contrib.auth.decorators import login_required


def mig_login_required(view):
    """login_required, unless MIG_NO_LOGIN is set (as the original could)."""
    protected = login_required(view)

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if settings.MIG_NO_LOGIN:
            return view(request, *args, **kwargs)
        return protected(request, *args, **kwargs)

    return wrapper
