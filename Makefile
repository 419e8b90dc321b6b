# make install [PREFIX=/usr/local] [DESTDIR=]  -- binaries, systemd units, tmpfiles rules,
#                                                the example service and its manifest
# make uninstall                                -- removes them again (not the image cache)
PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
UNITDIR     ?= /etc/systemd/system
TMPFILESDIR ?= /etc/tmpfiles.d
GENERATORDIR ?= /etc/systemd/system-generators
MANIFESTDIR ?= /etc/warmer/manifests
EXAMPLEDIR  ?= /opt/warmer/examples
DESTDIR     ?=

.PHONY: build install uninstall
build:
	cargo build --release --locked

install: build
	install -D -m 0755 target/release/warmer $(DESTDIR)$(BINDIR)/warmer
	install -D -m 0755 target/release/warmer-init $(DESTDIR)$(BINDIR)/warmer-init
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(TMPFILESDIR)
	for u in warmer@.service warmer-verify.service; do \
	  sed 's|/usr/local/bin/|$(BINDIR)/|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u; \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$u; done
	install -m 0644 systemd/warmer.conf $(DESTDIR)$(TMPFILESDIR)/warmer.conf
	install -d -m 0755 $(DESTDIR)$(GENERATORDIR)
	sed 's|/usr/local/bin/|$(BINDIR)/|g' systemd/warmer-generator > $(DESTDIR)$(GENERATORDIR)/warmer-generator
	chmod 0755 $(DESTDIR)$(GENERATORDIR)/warmer-generator
	install -D -m 0755 examples/slowweb/server.py $(DESTDIR)$(EXAMPLEDIR)/slowweb/server.py
	install -d -m 0755 $(DESTDIR)$(MANIFESTDIR)
	test -e $(DESTDIR)$(MANIFESTDIR)/slowweb.yaml || install -m 0644 manifests/slowweb.yaml $(DESTDIR)$(MANIFESTDIR)/slowweb.yaml
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemd-tmpfiles --create $(TMPFILESDIR)/warmer.conf; systemctl daemon-reload; fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/warmer $(DESTDIR)$(BINDIR)/warmer-init
	rm -f $(DESTDIR)$(UNITDIR)/warmer@.service $(DESTDIR)$(UNITDIR)/warmer-verify.service
	rm -f $(DESTDIR)$(TMPFILESDIR)/warmer.conf
	rm -f $(DESTDIR)$(GENERATORDIR)/warmer-generator
	rm -rf $(DESTDIR)$(EXAMPLEDIR)/slowweb
	rm -f $(DESTDIR)$(MANIFESTDIR)/slowweb.yaml
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "left in place: $(DESTDIR)/var/cache/warmer (images) and other manifests; remove them by hand"
