"""Template helpers: one way to show a time, one way to show a size or a duration."""

from datetime import UTC, datetime

from django import template
from django.utils.html import format_html

from ..helper.progress import human_bytes
from ..migration import duration_words

register = template.Library()


@register.simple_tag
def when(moment: datetime | None):
    """A time as every page shows it: ISO-8601 in the reader's zone (the page's script
    turns it so), with the UTC time on hover; without the script, in UTC."""
    if moment is None:
        return "—"
    text = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return format_html('<time datetime="{}" title="{}">{}</time>', moment.isoformat(), text, text)


@register.filter
def size(n):
    return human_bytes(n) if n else "—"


@register.filter
def seconds(value):
    """A duration in seconds (a float, a timedelta or None), as the pages show them."""
    if value is None:
        return "—"
    value = value.total_seconds() if hasattr(value, "total_seconds") else float(value)
    return f"{value:.1f} s" if value < 90 else duration_words(value)
