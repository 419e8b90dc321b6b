# make install [PREFIX=/usr/local] [DESTDIR=]  -- install-bin, plus the example service and its manifest
# make install-bin                              -- binaries, systemd units, generator, tmpfiles rules,
#                                                man pages, shell completions (what the .deb ships)
# make uninstall                                -- removes them again (not the image cache)
# The Debian package (scripts/package.sh) runs install-bin with Debian's paths.
PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
MANDIR      ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
UNITDIR     ?= /etc/systemd/system
TMPFILESDIR ?= /etc/tmpfiles.d
GENERATORDIR ?= /etc/systemd/system-generators
MANIFESTDIR ?= /etc/warmer/manifests
EXAMPLEDIR  ?= /opt/warmer/examples
DESTDIR     ?=
WARMER      := target/release/warmer

.PHONY: build install install-bin install-example uninstall
build:
	cargo build --release --locked

install: install-bin install-example
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemd-tmpfiles --create $(TMPFILESDIR)/warmer.conf; systemctl daemon-reload; fi

install-bin: build
	install -D -m 0755 $(WARMER) $(DESTDIR)$(BINDIR)/warmer
	install -D -m 0755 target/release/warmer-init $(DESTDIR)$(BINDIR)/warmer-init
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(TMPFILESDIR)
	for u in warmer@.service warmer-verify.service; do \
	  sed 's|/usr/local/bin/|$(BINDIR)/|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u; \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$u; done
	install -m 0644 systemd/warmer.conf $(DESTDIR)$(TMPFILESDIR)/warmer.conf
	install -d -m 0755 $(DESTDIR)$(GENERATORDIR)
	sed 's|/usr/local/bin/|$(BINDIR)/|g' systemd/warmer-generator > $(DESTDIR)$(GENERATORDIR)/warmer-generator
	chmod 0755 $(DESTDIR)$(GENERATORDIR)/warmer-generator
	rm -rf target/man && $(WARMER) man target/man >/dev/null
	install -d -m 0755 $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 0644 target/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 target/man/*.5 $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 target/man/*.8 $(DESTDIR)$(MANDIR)/man8/
	install -d -m 0755 $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	$(WARMER) completions bash > $(DESTDIR)$(BASHCOMPDIR)/warmer
	$(WARMER) completions zsh > $(DESTDIR)$(ZSHCOMPDIR)/_warmer
	$(WARMER) completions fish > $(DESTDIR)$(FISHCOMPDIR)/warmer.fish
	chmod 0644 $(DESTDIR)$(BASHCOMPDIR)/warmer $(DESTDIR)$(ZSHCOMPDIR)/_warmer $(DESTDIR)$(FISHCOMPDIR)/warmer.fish

install-example:
	install -D -m 0755 examples/slowweb/server.py $(DESTDIR)$(EXAMPLEDIR)/slowweb/server.py
	install -d -m 0755 $(DESTDIR)$(MANIFESTDIR)
	test -e $(DESTDIR)$(MANIFESTDIR)/slowweb.yaml || install -m 0644 manifests/slowweb.yaml $(DESTDIR)$(MANIFESTDIR)/slowweb.yaml

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/warmer $(DESTDIR)$(BINDIR)/warmer-init
	rm -f $(DESTDIR)$(UNITDIR)/warmer@.service $(DESTDIR)$(UNITDIR)/warmer-verify.service
	rm -f $(DESTDIR)$(TMPFILESDIR)/warmer.conf
	rm -f $(DESTDIR)$(GENERATORDIR)/warmer-generator
	rm -f $(DESTDIR)$(MANDIR)/man1/warmer.1 $(DESTDIR)$(MANDIR)/man1/warmer-*.1 $(DESTDIR)$(MANDIR)/man5/warmer.yaml.5 $(DESTDIR)$(MANDIR)/man8/warmer-init.8
	rm -f $(DESTDIR)$(BASHCOMPDIR)/warmer $(DESTDIR)$(ZSHCOMPDIR)/_warmer $(DESTDIR)$(FISHCOMPDIR)/warmer.fish
	rm -rf $(DESTDIR)$(EXAMPLEDIR)/slowweb
	rm -f $(DESTDIR)$(MANIFESTDIR)/slowweb.yaml
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "left in place: $(DESTDIR)/var/cache/warmer (images) and other manifests; remove them by hand"
