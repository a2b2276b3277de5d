from django.conf import settings


def mig(request):
    return {
        "login_disabled": settings.MIG_NO_LOGIN,
        "mig_grid": settings.MIG_GRID,
        "mig_app": settings.MIG_APP,
    }
