"""Who is asking: the client's address as the login lockout keys it (see settings, AXES_*)."""

from django.conf import settings
from django.http import HttpRequest


def client_ip(request: HttpRequest) -> str:
    """The client's address: REMOTE_ADDR, unless that is a proxy MIG_TRUSTED_PROXIES names;
    then the nearest address in X-Forwarded-For that is not one. The header is believed only
    from those proxies: anyone else could write in it whatever address they like."""
    remote = request.META.get("REMOTE_ADDR", "")
    if remote in settings.MIG_TRUSTED_PROXIES:
        hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        for hop in reversed(hops):
            if hop and hop not in settings.MIG_TRUSTED_PROXIES:
                return hop
    return remote
