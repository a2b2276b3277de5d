import os

from django.core.wsgi import get_wsgi_application

os.umask(0o077)  # as in manage.py: what MIG writes is its own
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "migsite.settings")

application = get_wsgi_application()
