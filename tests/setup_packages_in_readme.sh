#!/usr/bin/env bash
# The README's package table (section "Dependencies": rows "| `name` | why |")
# names exactly the packages of scripts/setup.sh, the list the set-up
# installs, so the two cannot drift apart.
#   bash tests/setup_packages_in_readme.sh SOURCE_DIR
set -euo pipefail
cd "$1"

script=$(bash scripts/setup.sh --list | sort)
readme=$(awk '/^## /{section = $0} section ~ /^## Dependencies/ && /^\| `[^`]+` \|/' README.md |
         sed -E 's/^\| `([^`]+)`.*/\1/' | sort)

if [ "$script" != "$readme" ]; then
  echo "README.md's Dependencies table and scripts/setup.sh's packages differ:"
  echo "only in scripts/setup.sh: $(comm -23 <(echo "$script") <(echo "$readme") | tr '\n' ' ')"
  echo "only in README.md:        $(comm -13 <(echo "$script") <(echo "$readme") | tr '\n' ' ')"
  exit 1
fi
echo "README.md's table names the $(echo "$script" | wc -l) packages of scripts/setup.sh"
