"""Django configured for a throwaway cluster: the scripts beside this one import it."""

import django
from django.conf import settings


def configure(port):
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "postgres",
                "USER": "postgres",
                "HOST": "127.0.0.1",
                "PORT": str(port),
            }
        },
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()
