# Least-privilege policy for the rotatord daemon on HashiCorp Vault / OpenBao (KV version 2).
#
# Written for the defaults mount = "secret" and path_prefix = "rotatord": replace "secret/" by
# your mount and "rotatord/" by your path_prefix.  Load it with
#
#     bao policy write rotatord-daemon contrib/vault/rotatord-daemon.hcl
#
# and give the daemon a periodic token or an AppRole holding only this policy, e.g.
#
#     bao write auth/approle/role/rotatord token_policies=rotatord-daemon token_period=1h
#
# rotatord needs nothing on sys/: it checks the mount with sys/internal/ui/mounts/<mount>, which
# any token holding a capability under the mount may call.

# The documents: read them, create new paths (check-and-set cas=0), write new versions (cas=N).
path "secret/data/rotatord/*" {
  capabilities = ["create", "read", "update"]
}

# The metadata of those paths: read versions for `rotatord history` and deleted-version checks;
# set cas_required, max_versions and custom_metadata["managed-by"] after the first write.
path "secret/metadata/rotatord/*" {
  capabilities = ["read", "update"]
}

# Its own token: look it up at start (TTL, renewable) and renew it at half its TTL.
# (The "default" policy grants these too; they are listed for tokens made with no_default_policy.)
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
