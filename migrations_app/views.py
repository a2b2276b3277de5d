from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.core.paginator import Paginator
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache

from . import migration
from .clients import client_ip
from .decorators import mig_login_required
from .forms import JobFilterForm, MigrateForm, OverrideForm
from .models import Grid, Lock, LockHeld, MigrationJob

EVENTS_IN_STATUS = 15


def who(request):
    if request.user.is_authenticated:
        return request.user.get_username()
    return f"anonymous at {client_ip(request) or '?'}"


class LoginView(auth_views.LoginView):
    template_name = "login.html"
    redirect_authenticated_user = True

    def dispatch(self, request, *args, **kwargs):
        if settings.MIG_NO_LOGIN:
            return redirect("index")
        return super().dispatch(request, *args, **kwargs)


def ping(request):
    """Is this MIG up? The monitor asks, from another origin, while the app moves."""
    response = JsonResponse({"ok": True})
    response["Access-Control-Allow-Origin"] = "*"
    return response


@mig_login_required
def index(request):
    if Lock.objects.exists():
        return redirect("lock")
    form = MigrateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        plan = form.preflight()
        if plan:
            try:
                job = migration.acquire(plan, who(request), form.cleaned_data["bwlimit"])
            except LockHeld as held:
                # A double click, or another browser first: both end on the one job.
                return redirect("job", held.lock.job_id)
            migration.start_runner(job, new_log=True)
            return redirect("job", job.pk)
    return render(request, "index.html", {"form": form, "grids": Grid.objects.listed()})


@mig_login_required
def lock(request):
    current = Lock.objects.current()
    if current is None:
        return redirect("index")
    return render(request, "lock.html", {"lock": current, "job": current.job})


@mig_login_required
def override(request):
    current = Lock.objects.current()
    if current is None:
        return redirect("index")
    form = OverrideForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        job = current.job
        job.override(who(request), form.cleaned_data["reason"])
        messages.warning(request, f"Job #{job.pk} was overridden; nothing on any grid was changed.")
        return redirect("index")
    return render(request, "override.html", {"form": form, "lock": current, "job": current.job})


@mig_login_required
def jobs(request):
    form = JobFilterForm(request.GET)
    page = Paginator(form.filter(MigrationJob.objects.all()), 50).get_page(request.GET.get("page"))
    return render(request, "jobs.html", {"form": form, "page": page})


@mig_login_required
def job(request, job_id):
    job = get_object_or_404(MigrationJob, pk=job_id)
    target = Grid.objects.filter(name=job.target_grid).first()
    monitor = {
        "job_id": job.pk,
        "action": job.action,
        "status_url": reverse("job_status", args=[job.pk]),
        # While MIG is down, the page asks the helper (read-only, with the job's token)...
        "token": job.status_token if job.is_active else "",
        # ...and then the target's MIG, once it answers.
        "target_url": target.app_url if target else "",
        "initial": status_dict(job),
    }
    phases = [(p, MigrationJob.State(p).label) for p in MigrationJob.HELPER_PHASES]
    context = {"job": job, "events": job.events.all(), "phases": phases, "monitor": monitor}
    return render(request, "job.html", context)


def status_dict(job):
    events = list(job.events.order_by("-created", "-pk")[:EVENTS_IN_STATUS])
    return {
        **job.to_dict(),
        # Known once the helper runs; the page asks it directly while MIG is down.
        "helper_url": job.status_url,
        "events": [
            {"time": e.created.isoformat(), "level": e.level, "phase": e.phase, "message": e.message}
            for e in reversed(events)
        ],
    }


@never_cache
@mig_login_required
def job_status(request, job_id):
    return JsonResponse(status_dict(get_object_or_404(MigrationJob, pk=job_id)))
