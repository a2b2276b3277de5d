"""Each failed login is answered a little later than the one before (django-axes counts them
and locks the user out after AXES_FAILURE_LIMIT)."""

import time

from axes.helpers import get_client_ip_address
from axes.models import AccessAttempt
from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver

MAX_DELAY = 2.0


@receiver(user_login_failed)
def slow_down_failed_login(sender, credentials, request=None, **kwargs):
    if request is None:
        return
    attempt = AccessAttempt.objects.filter(
        username=credentials.get("username"), ip_address=get_client_ip_address(request)
    ).first()
    failures = attempt.failures_since_start if attempt else 1
    time.sleep(min(0.25 * 2 ** (failures - 1), MAX_DELAY))
