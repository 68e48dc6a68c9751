"""The bundle: the egress proxy sidecar, a bottle's only way out.

The bundle directory is written on the host (`prepare`, `up`) and read by the bundle at /etc/bottle;
these names are the contract between the two sides.
"""

CONFIG_FILE = "config.json"  # the policy, rendered by `prepare`
SECRETS_FILE = "secrets.json"  # credential values, written by `up` from the host's env or files
CA_DIR = "ca"  # holds the CA, key and certificate, under the file name mitmproxy looks for
