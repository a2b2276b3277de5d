from django import forms
from django.utils.timesince import timesince

from . import migration
from .grids import InvalidName, validate_name
from .models import Grid, MigrationJob


def grid_label(grid):
    if grid.checked_at is None:
        return f"{grid.name} — not checked yet"
    result = "ok" if grid.check_ok else f"FAILED: {grid.check_message[:80]}"
    return f"{grid.name} — checked {timesince(grid.checked_at)} ago: {result}"


class MigrateForm(forms.Form):
    target_grid = forms.ChoiceField(label="Target grid", help_text="From grid.info, with its last check.")
    target_app = forms.CharField(
        label="Target app name",
        max_length=54,
        help_text="Letters, digits, '_' or '-', starting with a letter.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )
    action = forms.ChoiceField(label="Action", widget=forms.RadioSelect)
    bwlimit = forms.IntegerField(
        label="Bandwidth limit (KiB/s)",
        required=False,
        min_value=1,
        help_text="Optional: cap the copy so the app keeps its network.",
    )

    ACTION_LABELS = {
        "migrate": "Migrate — move this app to the target grid",
        "snapshot": "Snapshot — copy it there, stopped; this app keeps running",
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
            return validate_name(name)
        except InvalidName as e:
            raise forms.ValidationError(str(e)) from None

    def preflight(self):
        """Run the pre-flight; its errors land on the field they concern. Returns the plan."""
        grid, app, action = (self.cleaned_data[k] for k in ("target_grid", "target_app", "action"))
        try:
            plan = migration.preflight(grid, app, action)
        except migration.PreflightError as e:
            self.add_error(e.field, str(e))
            if e.field == "target_grid":
                Grid.objects.record_check(grid, False, str(e))
            return None
        Grid.objects.record_check(grid, True)
        return plan


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
