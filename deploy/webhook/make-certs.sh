#!/bin/sh
# The webhook's certificates by hand, with openssl (no cert-manager): a CA and a serving
# certificate for sidelink-webhook.sidelink-system.svc, valid DAYS days (default 365).
#
#   deploy/webhook/make-certs.sh DIR [DAYS]
#
# writes DIR/ca.key DIR/ca.crt DIR/tls.key DIR/tls.crt, and DIR/mutating-webhook.yaml: a
# copy of mutating-webhook.yaml trusting that CA (caBundle), without cert-manager's
# annotation. Then (README.md):
#   kubectl -n sidelink-system create secret tls sidelink-webhook-tls \
#     --cert=DIR/tls.crt --key=DIR/tls.key
#   kubectl apply -f DIR/mutating-webhook.yaml
# Run it again before DAYS are up (keep DIR/ca.* to keep the caBundle) and update the Secret:
# the webhook loads the new files itself.
set -eu

dir=${1:?usage: make-certs.sh DIR [DAYS]}
days=${2:-365}
service=sidelink-webhook
namespace=sidelink-system
here=$(dirname "$0")

mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.key" ] || [ ! -f "$dir/ca.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 \
    -subj "/CN=sidelink-webhook-ca" \
    -addext "basicConstraints = critical, CA:TRUE" \
    -addext "keyUsage = critical, keyCertSign, cRLSign" 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" -subj "/CN=$service.$namespace.svc" 2>/dev/null
printf '%s\n' \
  "subjectAltName = DNS:$service.$namespace.svc, DNS:$service.$namespace.svc.cluster.local" \
  "extendedKeyUsage = serverAuth" \
  "keyUsage = critical, digitalSignature" \
  "basicConstraints = critical, CA:FALSE" >"$dir/tls.ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
  -CAcreateserial -out "$dir/tls.crt" -days "$days" -extfile "$dir/tls.ext" 2>/dev/null
rm -f "$dir/tls.csr" "$dir/tls.ext" "$dir/ca.srl"

bundle=$(base64 <"$dir/ca.crt" | tr -d '\n')
# Drop the annotation block (cert-manager's) and give each clientConfig the CA.
awk -v bundle="$bundle" '
  /^  annotations:$/ { skip = 1; next }
  skip && /inject-ca-from/ { skip = 0; next }
  { print }
  /^  clientConfig:$/ { print "    caBundle: " bundle }
' "$here/mutating-webhook.yaml" >"$dir/mutating-webhook.yaml"
chmod 644 "$dir/ca.crt" "$dir/tls.crt" "$dir/mutating-webhook.yaml"
echo "wrote $dir/ca.crt $dir/tls.crt $dir/tls.key $dir/mutating-webhook.yaml"
