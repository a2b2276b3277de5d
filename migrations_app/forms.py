from django import forms
from django.utils.timesince import timesince

from . import migration
from .grids import TARGET_NAME_MAX, InvalidName, validate_target_name
from .helper import protocol
from .models import Grid, MigrationJob, Snapshot


def grid_label(grid):
    if grid.checked_at is None:
        return f"{grid.name} — not checked yet"
    result = "ok" if grid.check_ok else f"FAILED: {grid.check_message[:80]}"
    return f"{grid.name} — checked {timesince(grid.checked_at)} ago: {result}"


class MigrateForm(forms.Form):
    """What to do: the first step. Sending it runs the pre-flight and shows the plan."""

    target_grid = forms.ChoiceField(label="Target grid", help_text="From grid.info, with its last check.")
    # No maxlength: a browser would cut a long name silently, and the job would go to a name
    # nobody typed. The rule is checked here, and says what is wrong.
    target_app = forms.CharField(
        label="Target app name",
        help_text=f"1 to {TARGET_NAME_MAX} letters, digits, '_' or '-', starting with a letter.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )
    action = forms.ChoiceField(label="Action", widget=forms.RadioSelect)
    bwlimit = forms.IntegerField(
        label="Bandwidth limit (KiB/s)",
        required=False,
        min_value=1,
        help_text="Optional: cap the copy so the app keeps its network.",
    )
    max_downtime = forms.FloatField(
        label="Downtime budget (s)",
        required=False,
        help_text="Optional: before the stop, the helper predicts the downtime, and copies again "
        "while what changes meanwhile puts it over this.",
    )
    over_budget = forms.ChoiceField(
        label="If the prediction is still over the budget",
        choices=[
            (protocol.OverBudget.STOP, "End the job before the stop: this app keeps running here"),
            (protocol.OverBudget.PROCEED, "Go on anyway, over the budget"),
        ],
        initial=protocol.OverBudget.STOP,
        required=False,
        widget=forms.RadioSelect,
    )
    # A refresh of one of this app's snapshot copies (from the snapshots page).
    refresh = forms.ModelChoiceField(
        queryset=Snapshot.objects.kept(), required=False, widget=forms.HiddenInput()
    )

    ACTION_LABELS = {
        "migrate": "Migrate — move this app to the target grid; the source is destroyed afterwards",
        "snapshot": "Snapshot — copy it there, stopped; this app stops briefly for the final pass",
    }

    # Longer input is cut before anything sees it: it still fails validation, and the page
    # never echoes a megabyte back.
    ECHOED = 200

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.data.get("target_app", "")) > self.ECHOED:
            self.data = self.data.copy()
            self.data["target_app"] = self.data["target_app"][: self.ECHOED]
        self.fields["target_grid"].choices = [(g.name, grid_label(g)) for g in Grid.objects.listed()]
        actions = migration.allowed_actions()
        self.fields["action"].choices = [(a, self.ACTION_LABELS[a]) for a in actions]
        if len(actions) == 1:
            self.fields["action"].initial = actions[0]

    def clean_target_app(self):
        name = self.cleaned_data["target_app"].strip()
        try:
            return validate_target_name(name)
        except InvalidName as e:
            raise forms.ValidationError(str(e)) from None

    def clean(self):
        data = super().clean()
        data["budget"] = None
        if (seconds := data.get("max_downtime")) is not None:
            try:
                data["budget"] = migration.DowntimeBudget(seconds, data.get("over_budget"))
            except ValueError as e:
                self.add_error("max_downtime", str(e))
        return data

    def preflight(self):
        """Run the pre-flight; its errors land on the field they concern. Returns the plan."""
        grid, app, action = (self.cleaned_data[k] for k in ("target_grid", "target_app", "action"))
        try:
            plan = migration.preflight(
                grid,
                app,
                action,
                self.cleaned_data["bwlimit"],
                self.cleaned_data["refresh"],
                self.cleaned_data["budget"],
            )
        except migration.PreflightError as e:
            self.add_error(e.field, str(e))
            if e.field == "target_grid":
                Grid.objects.record_check(grid, False, str(e))
            return None
        Grid.objects.record_check(grid, True)
        return plan


class ConfirmForm(MigrateForm):
    """The second step: the plan is shown, with the first step's answers kept hidden, and a
    migration, which destroys the source, must be confirmed."""

    confirm = forms.BooleanField(required=False)

    def __init__(self, *args, plan, **kwargs):
        super().__init__(*args, **kwargs)
        for name in (
            "target_grid",
            "target_app",
            "action",
            "bwlimit",
            "max_downtime",
            "over_budget",
            "refresh",
        ):
            self.fields[name].widget = forms.HiddenInput()
        self.plan = plan
        if plan.action == "migrate":
            self.fields[
                "confirm"
            ].label = f"I understand: {plan.source} is destroyed once it runs on {plan.target}."
        else:
            self.fields["confirm"].widget = forms.HiddenInput()

    def clean(self):
        data = super().clean()
        if self.plan.action == "migrate" and not data.get("confirm"):
            self.add_error("confirm", "Tick the box to confirm: a migration destroys the source app.")
        return data


class SnapshotActionForm(forms.Form):
    """Start or delete a snapshot copy: what happens is said on the page, and confirmed."""

    confirm = forms.BooleanField(label="I understand what this does.")


class CancelForm(forms.Form):
    confirm = forms.BooleanField(
        label="Cancel the job: the helper rolls back, the source app runs again, and what the job "
        "created is removed."
    )


class OverrideForm(forms.Form):
    reason = forms.CharField(
        label="Why override the lock?",
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Recorded in the job's history with your name.",
    )
    confirm = forms.BooleanField(
        label="I understand: the job is marked overridden; nothing on any grid is changed or removed."
    )


class JobFilterForm(forms.Form):
    state = forms.ChoiceField(required=False, choices=[("", "any state"), *MigrationJob.State.choices])
    action = forms.ChoiceField(required=False, choices=[("", "any action"), *MigrationJob.Action.choices])
    grid = forms.CharField(required=False, max_length=64, label="Grid (source or target)")

    def filter(self, jobs):
        if not self.is_valid():
            return jobs.none()
        data = self.cleaned_data
        if data["state"]:
            jobs = jobs.filter(state=data["state"])
        if data["action"]:
            jobs = jobs.filter(action=data["action"])
        if data["grid"]:
            jobs = jobs.filter(source_grid=data["grid"]) | jobs.filter(target_grid=data["grid"])
        return jobs
