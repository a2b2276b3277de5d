from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.core.paginator import Paginator
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from . import migration, snapshots
from .clients import client_ip
from .decorators import mig_login_required
from .forms import CancelForm, ConfirmForm, JobFilterForm, MigrateForm, OverrideForm, SnapshotActionForm
from .helper.progress import human_bytes
from .models import Grid, Lock, LockHeld, MigrationJob, Snapshot


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
    """The job form; sending it runs the pre-flight and shows the plan to confirm."""
    if Lock.objects.exists():
        return redirect("lock")
    form = MigrateForm(request.POST or None)
    if request.method == "POST" and form.is_valid() and (plan := form.preflight()):
        confirm = ConfirmForm(plan=plan, initial=form.cleaned_data)
        return render(request, "confirm.html", {"form": confirm, "plan": plan})
    return render(request, "index.html", {"form": form, "grids": Grid.objects.listed()})


@require_POST
@mig_login_required
def start(request):
    """The plan was confirmed: pre-flight once more (things change), then start the job."""
    if current := Lock.objects.current():
        # A double click, or another browser first: both end on the one job.
        return redirect("job", current.job_id)
    form = MigrateForm(request.POST)
    if not form.is_valid() or (plan := form.preflight()) is None:
        return render(request, "index.html", {"form": form, "grids": Grid.objects.listed()})
    confirm = ConfirmForm(request.POST, plan=plan)
    if not confirm.is_valid():
        return render(request, "confirm.html", {"form": confirm, "plan": plan})
    try:
        job = migration.acquire(plan, who(request))
    except LockHeld as held:
        return redirect("job", held.lock.job_id)
    migration.start_runner(job, new_log=True)
    return redirect("job", job.pk)


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
        "cancel_url": reverse("job_cancel", args=[job.pk]),
        # While MIG is down, the page asks the helper (with the job's token)...
        "token": job.status_token if job.is_active else "",
        # ...and then the target's MIG, once it answers.
        "target_url": job.target_url or (target.app_url if target and "{port}" not in target.app_url else ""),
        # States in the order a job goes through them: the page never shows an older one.
        "order": [*MigrationJob.ACTIVE_STATES, *MigrationJob.ENDED_STATES],
        "ended": MigrationJob.ENDED_STATES,
        "labels": dict(MigrationJob.State.choices),
        "initial": job.to_dict(),
        "user": who(request),
    }
    phases = [(p, MigrationJob.State(p).label) for p in MigrationJob.HELPER_PHASES]
    context = {
        "job": job,
        "events": job.events.all(),
        "phases": phases,
        "monitor": monitor,
        "cancel_form": CancelForm(),
    }
    return render(request, "job.html", context)


@never_cache
@mig_login_required
def job_status(request, job_id):
    return JsonResponse(get_object_or_404(MigrationJob, pk=job_id).to_dict())


@require_POST
@mig_login_required
def job_cancel(request, job_id):
    """Cancel a running job (confirmed): it rolls back as a failure does, if it is not too
    late. The page asks by fetch and shows the answer; without a script, it comes back."""
    job = get_object_or_404(MigrationJob, pk=job_id)
    form = CancelForm(request.POST)
    try:
        if not form.is_valid():
            raise migration.CancelError("Tick the box to confirm the cancel.")
        said, ok = migration.cancel(job, who(request)), True
    except migration.CancelError as e:
        said, ok = str(e), False
    if request.headers.get("Accept") == "application/json":
        return JsonResponse({"ok": ok, "message": said}, status=200 if ok else 409)
    (messages.info if ok else messages.error)(request, said)
    return redirect("job", job.pk)


@mig_login_required
def snapshot_list(request):
    """The snapshot copies this app made, with what their grids say of them now."""
    seen = snapshots.look_at_all(Snapshot.objects.kept())
    deleted = Snapshot.objects.filter(state=Snapshot.State.DELETED)[:20]
    locked = Lock.objects.exists()
    return render(request, "snapshots.html", {"seen": seen, "deleted": deleted, "locked": locked})


@mig_login_required
def snapshot_refresh(request, snapshot_id):
    """A refresh is a snapshot job into the copy: its plan, to confirm, as for any job."""
    snapshot = get_object_or_404(Snapshot.objects.kept(), pk=snapshot_id)
    if Lock.objects.exists():
        return redirect("lock")
    data = {
        "target_grid": snapshot.grid,
        "target_app": snapshot.app,
        "action": "snapshot",
        "refresh": snapshot.pk,
    }
    form = MigrateForm(data)
    if form.is_valid() and (plan := form.preflight()):
        confirm = ConfirmForm(plan=plan, initial=form.cleaned_data)
        return render(request, "confirm.html", {"form": confirm, "plan": plan})
    errors = "; ".join(e for errors in form.errors.values() for e in errors)
    messages.error(request, f"{snapshot.name} cannot be refreshed: {errors}")
    return redirect("snapshots")


SNAPSHOT_ACTIONS = {
    # action: (what it does, in words for the confirmation; the operation)
    "start": (
        "Start {name} as an app of its own. It runs beside this app with its own copy of the data, "
        "as it was at {taken}, and its own MIG; it writes nothing here. It stays on this list, and "
        "can be refreshed or deleted again once it is stopped.",
        snapshots.start,
    ),
    "delete": (
        "Delete {name} and its data ({size}) from grid {grid}. This cannot be undone.",
        snapshots.delete,
    ),
}


@mig_login_required
def snapshot_action(request, snapshot_id, action):
    snapshot = get_object_or_404(Snapshot.objects.kept(), pk=snapshot_id)
    said, operation = SNAPSHOT_ACTIONS[action]
    form = SnapshotActionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            messages.success(request, operation(snapshot, who(request)))
        except snapshots.SnapshotError as e:
            messages.error(request, str(e))
        return redirect("snapshots")
    taken = f"{snapshot.taken:%Y-%m-%d %H:%M:%S} UTC"
    what = said.format(name=snapshot.name, grid=snapshot.grid, taken=taken, size=human_bytes(snapshot.bytes))
    context = {"snapshot": snapshot, "action": action, "what": what, "form": form}
    return render(request, "snapshot_action.html", context)
