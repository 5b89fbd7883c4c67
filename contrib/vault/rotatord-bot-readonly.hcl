# Read-only policy for one bot: it may read its own secret document, and nothing else.
#
# Written for mount = "secret", path_prefix = "rotatord" and the secret path
# "bots/support-bot/db-key": adjust the one path below.  Load it with
#
#     bao policy write support-bot-readonly contrib/vault/rotatord-bot-readonly.hcl
#
# A bot with this policy reads with rotatord.client.vault.VaultReader (or any Vault client:
# GET secret/data/rotatord/bots/support-bot/db-key, field "document").  It cannot write, list,
# read the metadata, or read another bot's secret.  Keep the "default" policy on the bot's token
# as well (Vault and OpenBao attach it unless told not to): VaultReader looks its token up and
# renews it through auth/token/lookup-self and auth/token/renew-self, which "default" grants.

path "secret/data/rotatord/bots/support-bot/db-key" {
  capabilities = ["read"]
}
