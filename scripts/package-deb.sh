#!/usr/bin/env bash
# Builds a Debian package of the extension for PostgreSQL 15: postgresql-15-rbucardo, version
# from Cargo.toml, for this machine's architecture. Prints the path of the .deb, written to
# target/debian/. Only builds (cargo pgrx package, dpkg-deb): installs nothing.
#   bash scripts/package-deb.sh
# DEB_MAINTAINER overrides the Maintainer field.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

PKG=postgresql-15-rbucardo
VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
ARCH=$(dpkg --print-architecture)
MAINTAINER=${DEB_MAINTAINER:-rbucardo maintainers <maintainers@users.noreply.r-seed-f2b90adc.example>}
LIBDIR=$("$PG_CONFIG" --pkglibdir)             # /usr/lib/postgresql/15/lib
EXTDIR=$("$PG_CONFIG" --sharedir)/extension    # /usr/share/postgresql/15/extension
OUT=target/debian
BUILD=$OUT/build                                # a debian/ tree, as dpkg-shlibdeps wants it
STAGE=$BUILD/debian/$PKG
DEB=$OUT/${PKG}_${VERSION}_${ARCH}.deb

say "building rbucardo $VERSION (cargo pgrx package)" >&2
package_extension

# Only the files this version ships (the package tree can hold install scripts that an earlier
# build of another version left there).
rm -rf "$BUILD"
umask 022
install -d "$STAGE/DEBIAN" "$STAGE$LIBDIR" "$STAGE$EXTDIR" "$STAGE/usr/share/doc/$PKG"
install -m 644 "$PKG_ROOT$LIBDIR/rbucardo.so" "$STAGE$LIBDIR/"
# Debian ships libraries without their symbol table (the exported symbols PostgreSQL looks up
# stay in .dynsym).
if command -v strip >/dev/null; then
    strip --strip-unneeded --remove-section=.comment "$STAGE$LIBDIR/rbucardo.so"
fi
install -m 644 "$PKG_EXTDIR/rbucardo.control" "$PKG_EXTDIR/rbucardo--$VERSION.sql" "$STAGE$EXTDIR/"
install -m 644 sql/releases/*.sql "$STAGE$EXTDIR/"
grep -q "^default_version = '$VERSION'$" "$STAGE$EXTDIR/rbucardo.control" \
    || { echo "rbucardo.control does not say default_version = '$VERSION'" >&2; exit 1; }

doc=$STAGE/usr/share/doc/$PKG
install -m 644 README.md "$doc/"
cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: rbucardo
Comment: Multi-master replication for PostgreSQL, inside PostgreSQL. Built from its source
 tree with cargo-pgrx $PGRX_VERSION; the library statically links Rust crates (pgrx, serde,
 serde_json, postcard, crc32fast, libpq-sys and their dependencies) under their own licences,
 MIT or Apache-2.0.

Files: *
Copyright: rbucardo maintainers
License: PostgreSQL
 Permission to use, copy, modify, and distribute this software and its documentation for any
 purpose, without fee, and without a written agreement is hereby granted, provided that the
 above copyright notice and this paragraph and the following two paragraphs appear in all
 copies.
 .
 IN NO EVENT SHALL THE AUTHORS BE LIABLE TO ANY PARTY FOR DIRECT, INDIRECT, SPECIAL,
 INCIDENTAL, OR CONSEQUENTIAL DAMAGES, INCLUDING LOST PROFITS, ARISING OUT OF THE USE OF THIS
 SOFTWARE AND ITS DOCUMENTATION, EVEN IF THE AUTHORS HAVE BEEN ADVISED OF THE POSSIBILITY OF
 SUCH DAMAGE.
 .
 THE AUTHORS SPECIFICALLY DISCLAIM ANY WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED
 WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE. THE SOFTWARE PROVIDED
 HEREUNDER IS ON AN "AS IS" BASIS, AND THE AUTHORS HAVE NO OBLIGATIONS TO PROVIDE MAINTENANCE,
 SUPPORT, UPDATES, ENHANCEMENTS, OR MODIFICATIONS.
EOF
{
    echo "$PKG ($VERSION) unstable; urgency=medium"
    echo
    echo "  * Built from the rbucardo source tree (scripts/package-deb.sh)."
    echo
    echo " -- $MAINTAINER  $(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")"
} | gzip -9n > "$doc/changelog.Debian.gz"
chmod 644 "$doc/changelog.Debian.gz"

# Shared libraries the .so needs (libc6, libgcc-s1, libpq5), with the versions dpkg-shlibdeps
# finds; a fixed list when dpkg-dev is missing.
printf 'Source: rbucardo\n\nPackage: %s\nArchitecture: any\n' "$PKG" > "$BUILD/debian/control"
if command -v dpkg-shlibdeps >/dev/null; then
    shlibs=$(cd "$BUILD" && dpkg-shlibdeps -O "debian/$PKG$LIBDIR/rbucardo.so" 2>/dev/null \
             | sed -n 's/^shlibs:Depends=//p')
else
    shlibs="libc6, libgcc-s1, libpq5"
fi
[ -n "$shlibs" ] || { echo "dpkg-shlibdeps found no dependencies" >&2; exit 1; }

(cd "$STAGE" && find usr -type f | LC_ALL=C sort | xargs md5sum) \
    > "$STAGE/DEBIAN/md5sums"
chmod 644 "$STAGE/DEBIAN/md5sums"
cat > "$STAGE/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
Depends: postgresql-15, $shlibs
Section: database
Priority: optional
Description: multi-master replication for PostgreSQL 15, inside PostgreSQL
 rbucardo replicates between a main server and many branch servers in every direction, as
 one extension: capture triggers, background workers that talk to peers over libpq, catalog
 tables and monitoring views, with no external daemon. Branches keep working while their link
 is down and converge by themselves when it returns.
 .
 The server must preload the library (shared_preload_libraries = 'rbucardo') and be
 restarted; then CREATE EXTENSION rbucardo, or ALTER EXTENSION rbucardo UPDATE in databases
 that have an earlier version.
EOF

mkdir -p "$OUT"
rm -f "$DEB"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
