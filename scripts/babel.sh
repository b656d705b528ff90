#!/usr/bin/env bash
# Re-runs the translation pipeline: extract the strings of the plugin (Python, Jinja, JS) into
# translations/messages.pot, merge them into every translations/<locale>/LC_MESSAGES/messages.po
# and compile the .mo files into the package (octoprint_flasher/translations), where OctoPrint
# loads them. Start a new language with: scripts/babel.sh new <locale>
set -euo pipefail
cd "$(dirname "$0")/.."
PYBABEL=.venv/bin/pybabel

"$PYBABEL" extract --mapping-file=babel.cfg --output-file=translations/messages.pot \
  --msgid-bugs-address="octoprint-flasher developers" --copyright-holder="octoprint-flasher developers" \
  --project=OctoPrint-Flasher --version="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("OctoPrint-Flasher"))')" \
  --ignore-dirs=".* ._ build tests demo bench docs node_modules" --sort-by-file --width=100 .

if [ "${1:-}" = "new" ]; then
  "$PYBABEL" init --input-file=translations/messages.pot --output-dir=translations --locale="$2"
fi

for po in translations/*/LC_MESSAGES/messages.po; do
  [ -e "$po" ] || continue
  locale=$(basename "$(dirname "$(dirname "$po")")")
  "$PYBABEL" update --input-file=translations/messages.pot --output-dir=translations \
    --locale="$locale" --width=100 --no-fuzzy-matching
  "$PYBABEL" compile --directory=translations --locale="$locale" --statistics
  mkdir -p "octoprint_flasher/translations/$locale/LC_MESSAGES"
  cp "translations/$locale/LC_MESSAGES/messages.po" "translations/$locale/LC_MESSAGES/messages.mo" \
    "octoprint_flasher/translations/$locale/LC_MESSAGES/"
  rm -f "translations/$locale/LC_MESSAGES/messages.mo"
done
