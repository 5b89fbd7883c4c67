#!/bin/sh
# rotatord hook: reload a consumer that cannot take webhooks, so it re-reads its key ring.
#
#   [[secrets.hooks]]
#   command = ["/usr/local/lib/rotatord/reload_consumer.sh", "bot.service"]
#   phases = ["staged", "promoted"]
#   on_failure = "block"     # do not promote (or retire) before the bot has the new ring
#
# At "staged" the bot must learn the new key (decrypt-only) before anything is written under it;
# at "promoted" it starts encrypting with it.  The unit must implement ExecReload= (for instance
# by re-reading the secret on SIGHUP).  The daemon's user needs the right to reload that one
# unit, through a polkit rule (sudo cannot work: the shipped unit sets NoNewPrivileges=yes), e.g.
#   /etc/polkit-1/rules.d/50-rotatord-reload.rules:
#   polkit.addRule(function(action, subject) {
#     if (action.id == "org.freedesktop.systemd1.manage-units" && subject.user == "rotatord" &&
#         action.lookup("unit") == "bot.service" && action.lookup("verb") == "reload")
#       return polkit.Result.YES;
#   });
# No key material is involved: the bot reads the secret from the backend itself.
set -eu
unit="${1:?usage: reload_consumer.sh UNIT}"
echo "reloading $unit after $ROTATORD_PHASE of $ROTATORD_SECRET (version $ROTATORD_VERSION)"
exec /usr/bin/systemctl reload "$unit"
