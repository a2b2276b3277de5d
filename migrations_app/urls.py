from django.contrib.auth.views import LogoutView
from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("start/", views.start, name="start"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", LogoutView.as_view(), name="logout"),
    path("lock/", views.lock, name="lock"),
    path("lock/override/", views.override, name="override"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/<int:job_id>/", views.job, name="job"),
    path("jobs/<int:job_id>/status.json", views.job_status, name="job_status"),
    path("jobs/<int:job_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("snapshots/", views.snapshot_list, name="snapshots"),
    path("snapshots/<int:snapshot_id>/refresh/", views.snapshot_refresh, name="snapshot_refresh"),
    path(
        "snapshots/<int:snapshot_id>/start/",
        views.snapshot_action,
        {"action": "start"},
        name="snapshot_start",
    ),
    path(
        "snapshots/<int:snapshot_id>/delete/",
        views.snapshot_action,
        {"action": "delete"},
        name="snapshot_delete",
    ),
    path("ping/", views.ping, name="ping"),
]
