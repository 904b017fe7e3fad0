#!/bin/sh
# Set DVC up for a container, then run the command. A mounted checkout keeps using git; an image copy of the
# project has no .git, so DVC runs with core.no_scm (no git: experiments are not available, repro is).
set -eu
cd /app
if [ ! -e .git ] && [ -d .dvc ]; then
  dvc config --local core.no_scm true >/dev/null
fi
exec "$@"
