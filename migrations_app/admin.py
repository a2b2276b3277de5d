from django.contrib import admin

from .models import Grid, JobEvent, Lock, MigrationJob, Snapshot


@admin.register(Grid)
class GridAdmin(admin.ModelAdmin):
    list_display = ("name", "driver", "transport", "host", "root", "in_grid_info", "check_ok", "checked_at")
    list_filter = ("driver", "transport", "in_grid_info", "check_ok")
    search_fields = ("name", "host", "root")
    # grid.info is the source of truth; startup mirrors it here.
    readonly_fields = [f.name for f in Grid._meta.fields]


class JobEventInline(admin.TabularInline):
    model = JobEvent
    fields = ("created", "level", "phase", "message", "data")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False


class LockInline(admin.StackedInline):
    model = Lock
    fields = ("created",)
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(MigrationJob)
class MigrationJobAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "action",
        "state",
        "source_grid",
        "source_app",
        "target_grid",
        "target_app",
        "started_by",
        "created",
        "finished",
    )
    list_filter = ("state", "action", "source_grid", "target_grid")
    search_fields = ("source_app", "target_app", "started_by", "error")
    date_hierarchy = "created"
    inlines = [LockInline, JobEventInline]
    exclude = ("status_token",)

    def get_readonly_fields(self, request, obj=None):
        # History is a record: nothing in it is edited by hand.
        return [f.name for f in MigrationJob._meta.fields if f.name != "status_token"]

    def has_add_permission(self, request):
        return False


@admin.register(JobEvent)
class JobEventAdmin(admin.ModelAdmin):
    list_display = ("created", "job", "level", "phase", "message")
    list_filter = ("level", "phase")
    search_fields = ("message",)
    list_select_related = ("job",)
    readonly_fields = ("job", "created", "level", "phase", "message", "data", "seq")

    def has_add_permission(self, request):
        return False


@admin.register(Lock)
class LockAdmin(admin.ModelAdmin):
    list_display = ("job", "created", "job_state", "job_started_by")
    list_select_related = ("job",)
    readonly_fields = ("job", "created")

    @admin.display(description="job state")
    def job_state(self, lock):
        return lock.job.get_state_display()

    @admin.display(description="started by")
    def job_started_by(self, lock):
        return lock.job.started_by

    # A lock is only taken by migrate_app and only removed by startup or by the override
    # page, which asks why and records who did it.
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    list_display = ("grid", "app", "state", "taken", "bytes", "started", "deleted")
    list_filter = ("state", "grid")
    search_fields = ("app",)

    # What is on a grid is changed from MIG's Snapshots page, which asks first and checks
    # the copy's owner tag: the record here is history.
    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Snapshot._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
