from django.conf import settings


def mig(request):
    return {
        "login_disabled": not settings.MIG_USERNAME,
        "mig_grid": settings.MIG_GRID,
        "mig_app": settings.MIG_APP,
    }
