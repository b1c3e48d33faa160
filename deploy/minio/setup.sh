#!/bin/sh
# One-shot MinIO setup for deploy/compose.yaml (run by the `minio-setup` service, in the
# minio/mc image, which is minimal, so: mc and shell builtins only): the results bucket with
# versioning, and one access key each for the control planes and the daemons, allowed only
# that bucket (gpuplane-bucket.json names it). Idempotent: every `up` runs it.
set -eu

mc alias set local "$S3_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$BUCKET"
# Versioning: an overwritten or deleted result can be restored, and bucket replication
# (deploy/README.md, backups) requires it.
mc version enable "local/$BUCKET"

# The control planes' and daemons' policy: read and write the bucket's objects, nothing else.
mc admin policy create local gpuplane-bucket /gpuplane-bucket.json

add_user() {
    mc admin user add local "$1" "$2"
    # `attach` fails when the policy is attached already (a second run): that is fine.
    mc admin policy attach local gpuplane-bucket --user "$1" > /dev/null 2>&1 || true
    case "$(mc admin user info local "$1")" in
    *gpuplane-bucket*) ;;
    *) echo "minio-setup: policy gpuplane-bucket is not attached to $1" >&2; exit 1 ;;
    esac
}
add_user "$CONTROLPLANE_S3_ACCESS_KEY" "$CONTROLPLANE_S3_SECRET_KEY"
add_user "$DAEMON_S3_ACCESS_KEY" "$DAEMON_S3_SECRET_KEY"
echo "minio-setup: bucket $BUCKET ready"
