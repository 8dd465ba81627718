"""The example's WSGI app, after a query in the importing process (gunicorn ``--preload``).

The master then holds an idle pooled connection when it forks the workers: they
must never use it (the pool forgets inherited connections in the child).
"""

from django.db import connection
from project.wsgi import application  # noqa: F401 - what gunicorn serves

with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
connection.close()  # back to the master's pool, idle
