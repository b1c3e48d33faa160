#!/bin/sh
# One-shot MinIO setup for deploy/compose.yaml (run by the `minio-setup` service, in the
# minio/mc image, which is minimal, so: mc and shell builtins only): the results bucket with
# versioning, and the control planes' access key, allowed only that bucket
# (gpuplane-bucket.json names it). Daemons get no key: each dispatch carries presigned URLs and
# a POST policy for its own attempt, signed with this key (docs/DESIGN.md, "Storage scoped to
# one attempt"). Idempotent: every `up` runs it.
set -eu

mc alias set local "$S3_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$BUCKET"
# Versioning: an overwritten or deleted result can be restored, and bucket replication
# (deploy/README.md, backups) requires it.
mc version enable "local/$BUCKET"

# The control planes' policy: read and write the bucket's objects, nothing else. What a grant
# allows a daemon is at most this, narrowed by its signature to one attempt.
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
echo "minio-setup: bucket $BUCKET ready"
