"""The invoke collection: every task lives in toa/commands/<concern>.py and is gathered here.

Used by the top-level tasks.py (``invoke ...``) and by the ``toa`` console command.
"""

from invoke import Collection

from toa.commands import build, deploy, detect, export, lab, matrix, package, render, test

ns = Collection()
for concern_task in (detect.detect, detect.headers, test.test, lab.verify, build.build, build.images,
                     build.preflight, render.render, deploy.deploy, deploy.status, package.package, package.sign,
                     export.export, matrix.matrix):
    ns.add_task(concern_task)
