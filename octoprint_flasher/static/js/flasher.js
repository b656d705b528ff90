/*
 * Firmware Updater page: pick a device, upload a firmware file, see the pre-flight verdict,
 * flash with live progress and log, and keep a history. Every request shows its HTTP error;
 * the page resyncs from /status so a reload mid-flash shows the running flash.
 */
$(function () {
    "use strict";
    var F = window.FlasherFormat;
    var METHODS = ["auto", "stk500v1", "stk500v2", "dfu", "katapult", "picoboot", "marlin-sd"];
    var LOG_LIMIT = 1000;

    function FlasherViewModel(parameters) {
        var self = this;
        self.settingsViewModel = parameters[0];
        self.loginState = parameters[1];
        self.access = parameters[2];
        self.base = OctoPrint.getBlueprintUrl("flasher");
        self.F = F;
        self.methods = METHODS;

        // -- permission
        self.mayFlash = ko.pureComputed(function () {
            var perms = self.access.permissions;
            if (!perms || !perms.PLUGIN_FLASHER_FLASH) return false;
            return self.loginState.hasPermission(perms.PLUGIN_FLASHER_FLASH);
        });

        // -- target
        self.devices = ko.observableArray([]);
        self.deviceWarnings = ko.observableArray([]);
        self.loadingDevices = ko.observable(false);
        self.selectedDevice = ko.observable(undefined);
        self.deviceCaption = gettext("-- choose a device --");
        self.manualPort = ko.observable("");
        self.method = ko.observable("auto");
        self.mcu = ko.observable("");
        self.address = ko.observable("");
        self.allowBootloader = ko.observable(false);
        self.backup = ko.observable(false);
        self.quick = ko.observable(false);
        self.printerBoard = ko.observable(false);
        self.sdFamily = ko.observable("");
        self.promptText = ko.observable("");
        self.rescueText = ko.observable("");

        // -- file and verdict
        self.fileName = ko.observable("");
        self.fileError = ko.observable("");
        self.uploading = ko.observable(false);
        self.uploadPercent = ko.observable(0);
        self.image = ko.observable(null);
        self.preflight = ko.observable(null);
        self.checkedTarget = ko.observable("");

        // -- job
        self.state = ko.observable("idle");
        self.stage = ko.observable("");
        self.done = ko.observable(0);
        self.total = ko.observable(0);
        self.percent = ko.observable(0);
        self.rate = ko.observable(0);
        self.eta = ko.observable(null);
        self.logLines = ko.observableArray([]);
        self.result = ko.observable(null);
        self.httpError = ko.observable(null);

        // -- history and confirmation
        self.history = ko.observableArray([]);
        self.confirmText = ko.observableArray([]);
        self.confirmVisible = ko.observable(false);
        self.confirmDanger = ko.observable(false);
        self._confirmAction = null;

        self.maxBytes = function () {
            var s = self.settingsViewModel.settings;
            var mb = s && s.plugins && s.plugins.flasher ? s.plugins.flasher.max_upload_mb() : 16;
            return Number(mb || 16) * 1024 * 1024;
        };

        self.running = ko.pureComputed(function () {
            var s = self.state();
            return s && ["idle", "done", "failed", "cancelled"].indexOf(s) < 0;
        });

        self.target = ko.pureComputed(function () {
            var t = {method: self.method()};
            var manual = (self.manualPort() || "").trim();
            var dev = self.findDevice(self.selectedDevice());
            if (manual) {
                t.port = manual;
            } else if (dev) {
                // discovery knows the method of boards no probe can tell (RP2040 boot ROM, ...)
                // "auto" for a port nothing was learnt about; a probe or OctoPrint's M115 names it
                var preferred = dev.preferred_method || dev.method;
                if (t.method === "auto" && preferred) t.method = preferred;
                if (dev.port) t.port = dev.port;
                if (dev.usb_path) t.usb_path = dev.usb_path;
                if (dev.kind === "usb-dfu" && dev.usb_id) t.usb = dev.usb_id;
                if (dev.uuid) t.uuid = dev.uuid;
                if (dev.chip) t.mcu = dev.chip;
                if (dev.details && dev.details.can_channel) t.can_channel = dev.details.can_channel;
            }
            if ((self.mcu() || "").trim()) t.mcu = self.mcu().trim();
            if ((self.address() || "").trim()) t.address = self.address().trim();
            if (self.allowBootloader()) t.allow_bootloader_erase = true;
            if (self.quick()) t.quick = true;
            if (t.method === "marlin-sd" && self.sdFamily()) t.sd_family = self.sdFamily();
            return t;
        });
        // the printer is disconnected only for its own board: its port, or the user says so
        self.isPrinterPort = ko.pureComputed(function () {
            var dev = self.findDevice(self.selectedDevice());
            return !!(dev && dev.printer && !(self.manualPort() || "").trim());
        });
        self.isPrinterTarget = ko.pureComputed(function () {
            return self.isPrinterPort() || self.printerBoard();
        });
        // the printer takes a firmware.bin over its own serial link (Marlin file transfer)
        self.isSdUpload = ko.pureComputed(function () {
            return self.target().method === "marlin-sd";
        });
        self.rescue = function () {
            var port = self.target().port;
            if (!port) return;
            self.rescueText("");
            $.ajax({
                url: self.base + "rescue",
                type: "POST",
                data: JSON.stringify({port: port}),
                contentType: "application/json; charset=UTF-8",
                dataType: "json"
            })
                .done(function (data) {
                    self.rescueText(data.message || "");
                })
                .fail(function (xhr) {
                    self.showHttpError(gettext("Rescue"), xhr);
                });
        };
        self.targetJson = ko.pureComputed(function () {
            return JSON.stringify(self.target());
        });

        self.hasTarget = ko.pureComputed(function () {
            var t = self.target();
            return !!(t.port || t.usb || t.usb_path || t.uuid || t.method === "dfu");
        });
        self.preflightOk = ko.pureComputed(function () {
            var p = self.preflight();
            return !!p && p.ok;
        });
        self.preflightStale = ko.pureComputed(function () {
            return !!self.image() && self.checkedTarget() !== self.targetJson();
        });
        self.canFlash = ko.pureComputed(function () {
            return (
                self.mayFlash() &&
                !!self.image() &&
                self.preflightOk() &&
                !self.preflightStale() &&
                !self.uploading() &&
                !self.running() &&
                self.hasTarget()
            );
        });
        self.progressText = ko.pureComputed(function () {
            return F.percentText(self.percent());
        });
        self.progressWidth = ko.pureComputed(function () {
            return self.percent() + "%";
        });
        self.rateText = ko.pureComputed(function () {
            return F.rate(self.rate());
        });
        self.etaText = ko.pureComputed(function () {
            var e = self.eta();
            return e === null || e === undefined ? "" : F.duration(e);
        });
        self.stageText = ko.pureComputed(function () {
            // a finished job keeps its last flash stage in status(); show the outcome instead
            var state = self.state();
            if (state === "done" || state === "failed" || state === "cancelled") {
                return self.stageLabel(state);
            }
            var label = self.stageLabel(self.stage() || state);
            var image = self.image();
            var pass = F.phase(self.stage(), !!(image && image.external && image.external.length));
            if (pass === "firmware") return gettext("1/2 firmware") + " \u00b7 " + label;
            if (pass === "languages") return gettext("2/2 languages") + " \u00b7 " + label;
            return label;
        });
        self.logText = ko.pureComputed(function () {
            return self.logLines().join("\n");
        });
        self.resultClass = ko.pureComputed(function () {
            var r = self.result();
            if (!r) return "";
            // written but not confirmed is neither success nor failure: a warning
            if (r.state === "unconfirmed" || r.partial) return "flasher-unconfirmed alert";
            return r.ok ? "flasher-success alert alert-success" : "flasher-failure alert alert-error";
        });
        self.preflightClass = ko.pureComputed(function () {
            var p = self.preflight();
            if (!p) return "";
            return p.ok ? "flasher-ok alert alert-success" : "flasher-error alert alert-error";
        });

        // -- helpers
        self.findDevice = function (id) {
            return _.find(self.devices(), function (d) {
                return d.id === id;
            });
        };
        self.deviceLabel = function (d) {
            return F.deviceLabel(d, gettext("the printer"));
        };
        self.stageLabel = function (name) {
            var labels = {
                idle: gettext("Idle"),
                preflight: gettext("Checking the image"),
                disconnecting: gettext("Disconnecting the printer"),
                entering_bootloader: gettext("Entering the bootloader"),
                backing_up: gettext("Reading a backup"),
                reading_languages: gettext("Comparing the languages"),
                writing_languages: gettext("Writing the languages"),
                verifying_languages: gettext("Verifying the languages"),
                reading: gettext("Reading a backup"),
                erasing: gettext("Erasing"),
                writing: gettext("Writing"),
                verifying: gettext("Verifying (reading back)"),
                leaving_bootloader: gettext("Starting the new firmware"),
                flashing_from_sd: gettext("Waiting for the board to flash itself from the SD card"),
                reconnecting: gettext("Reconnecting the printer"),
                done: gettext("Done"),
                failed: gettext("Failed"),
                cancelled: gettext("Cancelled")
            };
            return labels[name] || name || "";
        };
        self.showHttpError = function (what, xhr) {
            var body = (xhr && xhr.responseJSON) || {};
            if (!xhr || !xhr.responseJSON) {
                try {
                    body = JSON.parse(xhr.responseText);
                } catch (e) {
                    body = {};
                }
            }
            var status = xhr ? xhr.status : 0;
            var message = body.error || (xhr && xhr.statusText) || gettext("No answer");
            if (status === 400 && !body.error && what === gettext("Upload")) {
                message = gettext(
                    "The server refused the upload (is the file larger than the upload limit?)"
                );
            }
            if (status === 403) {
                message = body.error || gettext("You lack the permission to flash firmware.");
            }
            self.httpError({
                what: what,
                status: status,
                message: message,
                cause: body.cause || "",
                hint: body.hint || ""
            });
        };
        self.clearHttpError = function () {
            self.httpError(null);
        };

        // -- devices
        self.refreshDevices = function () {
            if (!self.mayFlash()) return;
            self.loadingDevices(true);
            $.ajax({url: self.base + "devices", type: "GET", dataType: "json"})
                .done(function (data) {
                    var keep = self.selectedDevice();
                    self.devices(data.devices || []);
                    self.deviceWarnings(data.warnings || []);
                    if (keep && self.findDevice(keep)) {
                        self.selectedDevice(keep);
                    } else {
                        // the printer OctoPrint talks to, else the port flashed last time
                        var last = self.settingValue("last_port");
                        var match =
                            _.find(self.devices(), function (d) {
                                return d.printer;
                            }) ||
                            _.find(self.devices(), function (d) {
                                return last && d.port === last;
                            });
                        if (match) self.selectedDevice(match.id);
                    }
                })
                .fail(function (xhr) {
                    self.showHttpError(gettext("Device list"), xhr);
                })
                .always(function () {
                    self.loadingDevices(false);
                });
        };
        self.settingValue = function (key) {
            var s = self.settingsViewModel.settings;
            if (!s || !s.plugins || !s.plugins.flasher || !s.plugins.flasher[key]) return undefined;
            return s.plugins.flasher[key]();
        };

        // -- upload
        self.fileInput = function () {
            return $("#flasher_file")[0];
        };
        self.onFileChosen = function () {
            self.image(null);
            self.preflight(null);
            self.result(null);
            if (!self.running()) self.clearJobDisplay();
            self.upload();
        };
        // a new file starts a new story: the last job's "Done / 100 %" and log would read as
        // this file's result
        self.clearJobDisplay = function () {
            self.state("idle");
            self.stage("");
            self.applyProgress({done: 0, total: 0, percent: 0, rate: 0, eta: null});
            self.logLines([]);
        };
        self.upload = function () {
            var input = self.fileInput();
            var file = input && input.files && input.files[0];
            self.fileName(file ? file.name : "");
            var problem = F.checkFile(file && file.name, file && file.size, self.maxBytes());
            if (problem) {
                self.fileError(self.fileProblemText(problem));
                return;
            }
            self.fileError("");
            self.clearHttpError();
            var targetJson = self.targetJson();
            var form = new FormData();
            form.append("file", file, file.name);
            form.append("target", targetJson);
            self.uploading(true);
            self.uploadPercent(0);
            $.ajax({
                url: self.base + "upload",
                type: "POST",
                data: form,
                processData: false,
                contentType: false,
                dataType: "json",
                xhr: function () {
                    var xhr = $.ajaxSettings.xhr();
                    if (xhr.upload) {
                        xhr.upload.addEventListener("progress", function (e) {
                            if (e.lengthComputable) self.uploadPercent(F.percent(e.loaded, e.total));
                        });
                    }
                    return xhr;
                }
            })
                .done(function (data) {
                    self.image(data.image);
                    self.preflight(data.preflight);
                    self.checkedTarget(targetJson);
                })
                .fail(function (xhr) {
                    self.image(null);
                    self.preflight(null);
                    self.showHttpError(gettext("Upload"), xhr);
                })
                .always(function () {
                    self.uploading(false);
                });
        };
        self.fileProblemText = function (p) {
            if (p.code === "none") return gettext("Choose a firmware file first.");
            if (p.code === "type")
                return _.sprintf(
                    gettext("%(ext)s files cannot be flashed: choose a .hex, .bin, .dfu or .uf2 file."),
                    {ext: p.ext || gettext("These")}
                );
            if (p.code === "empty") return gettext("The file is empty.");
            return _.sprintf(
                gettext("The file is %(size)s, more than the upload limit of %(max)s."),
                {size: F.size(p.size), max: F.size(p.max)}
            );
        };
        // a changed target makes the verdict stale: check the same file again
        self.targetJson.subscribe(
            _.debounce(function () {
                if (self.fileName() && self.preflightStale() && !self.uploading()) self.upload();
            }, 400)
        );

        // -- flash
        // every flash is confirmed: it disconnects the printer and rewrites the board
        self.flash = function () {
            if (!self.canFlash()) return;
            var p = self.preflight();
            var t = self.target();
            var lines = [
                _.sprintf(gettext("Flash %(file)s to %(target)s?"), {
                    file: self.image().filename,
                    target: t.port || t.uuid || t.usb || t.usb_path || t.method
                }),
                self.isPrinterTarget()
                    ? gettext("The printer is disconnected while flashing and reconnected afterwards.")
                    : gettext("The printer stays connected: this board is not the printer's.")
            ];
            _.each(p.warnings || [], function (w) {
                lines.push(gettext("Warning:") + " " + w);
            });
            if (self.allowBootloader()) {
                lines.push(
                    gettext(
                        "You allowed writing over the bootloader: if this image is wrong, " +
                            "the board needs an ISP programmer to recover."
                    )
                );
            }
            var danger = !!(p.warnings && p.warnings.length) || self.allowBootloader();
            self.askConfirm(
                lines,
                function () {
                    self.startFlash(true);
                },
                danger
            );
        };
        self.startFlash = function (confirmed) {
            self.clearHttpError();
            self.promptText("");
            self.result(null);
            self.logLines([]);
            var body = {
                image_id: self.image().id,
                target: self.target(),
                confirm: !!confirmed,
                backup: !!self.backup(),
                printer_board: !!self.printerBoard()
            };
            self.postJson("flash", body, gettext("Flash"));
        };
        self.postJson = function (path, body, what) {
            return $.ajax({
                url: self.base + path,
                type: "POST",
                data: JSON.stringify(body || {}),
                contentType: "application/json; charset=UTF-8",
                dataType: "json"
            })
                .done(function (data) {
                    if (data && data.status) self.applyStatus(data.status);
                })
                .fail(function (xhr) {
                    self.showHttpError(what, xhr);
                });
        };
        self.cancel = function () {
            self.postJson("cancel", {}, gettext("Cancel"));
        };

        // -- confirmation
        self.askConfirm = function (lines, action, danger) {
            self.confirmText(lines);
            self.confirmDanger(!!danger);
            self._confirmAction = action;
            self.confirmVisible(true);
        };
        self.confirmOk = function () {
            var action = self._confirmAction;
            self._confirmAction = null;
            self.confirmVisible(false);
            if (action) action();
        };
        self.confirmCancel = function () {
            self._confirmAction = null;
            self.confirmVisible(false);
        };

        // -- status and messages
        self.requestStatus = function () {
            if (!self.mayFlash()) return;
            $.ajax({url: self.base + "status", type: "GET", dataType: "json"})
                .done(function (status) {
                    self.applyStatus(status, true);
                })
                .fail(function (xhr) {
                    self.showHttpError(gettext("Status"), xhr);
                });
        };
        self.applyStatus = function (status, withLog) {
            if (!status) return;
            self.state(status.state || "idle");
            self.stage(status.stage || "");
            self.applyProgress(status.progress || {});
            if (withLog && status.log) self.logLines(status.log.slice(-LOG_LIMIT));
            if (status.result) self.applyResult(status.result);
            else if (self.running()) self.result(null);
        };
        self.applyProgress = function (p) {
            if (p.stage) self.stage(p.stage);
            self.done(p.done || 0);
            self.total(p.total || 0);
            var pct = p.percent !== undefined && p.percent !== null ? p.percent : F.percent(p.done, p.total);
            self.percent(Math.max(0, Math.min(100, Math.floor(pct))));
            self.rate(p.rate || 0);
            self.eta(p.eta === undefined ? null : p.eta);
        };
        self.boardStateText = function (state) {
            if (state === "bootloader")
                return gettext("The board is waiting in its bootloader: the next Flash goes straight to it.");
            if (state === "untouched") return gettext("No board was touched.");
            return "";
        };
        // how a success was established: read back, or only the firmware's own report
        self.verifiedText = function (verifiedBy) {
            // a read-back verify is in the job's message already ("verified by reading it back")
            if (verifiedBy === "read-back") return "";
            if (verifiedBy === "firmware-report")
                return gettext(
                    "Confirmed by the firmware's own report; the flash cannot be read back over this path."
                );
            return ""; // not-confirmed: the message itself says so, with the reason
        };
        self.applyResult = function (r) {
            var error = r.error || {};
            // the job's message names its outcome "status"; GET /history names it "result"
            var state = r.status || r.result;
            var ok = state === "success" || r.ok === true;
            var outcome = F.outcome(r);
            self.result({
                ok: ok,
                state: state || (ok ? "success" : "failed"),
                verified: self.verifiedText(r.verified_by),
                // the firmware pass of two succeeded: the printer runs, without the languages
                partial: outcome.partial,
                next: outcome.next,
                message:
                    outcome.message ||
                    (ok ? gettext("Firmware flashed and verified.") : gettext("The flash failed.")),
                cause: r.cause || error.cause || "",
                // the job adds where the board stays to both the message and the hint
                hint: (r.hint || error.hint || "").replace(r.board_message || "\u0000", "").trim(),
                warnings: r.warnings || [],
                board: self.boardStateText(r.board_state),
                // the evidence alone: the verified line already says how it was confirmed
                confirmation: (r.confirmation || "")
                    .replace(/^Confirmed:\s*/, "")
                    .replace(/;\s*the flash cannot be read back over this path\.?$/, ""),
                details: r
            });
            if (ok) self.percent(100);
            self.loadHistory();
        };
        self.onDataUpdaterPluginMessage = function (plugin, data) {
            if (plugin !== "flasher" || !data) return;
            if (data.type === "state") {
                self.state(data.state || self.state());
                if (data.stage !== undefined) self.stage(data.stage || "");
                if (data.state && self.running()) self.result(null);
            } else if (data.type === "progress") {
                self.applyProgress(data);
            } else if (data.type === "log") {
                var lines = data.lines || (data.line !== undefined ? [data.line] : []);
                var all = self.logLines().concat(lines);
                self.logLines(all.slice(-LOG_LIMIT));
            } else if (data.type === "result") {
                self.promptText("");
                self.applyResult(data);
            } else if (data.type === "prompt") {
                self.promptText(data.message || "");
            }
        };

        // -- history
        self.loadHistory = function () {
            if (!self.mayFlash()) return;
            $.ajax({url: self.base + "history", type: "GET", dataType: "json"})
                .done(function (data) {
                    self.history(data.history || []); // newest first
                })
                .fail(function (xhr) {
                    self.showHttpError(gettext("History"), xhr);
                });
        };
        self.reflash = function (record) {
            self.askConfirm(
                [_.sprintf(gettext("Flash %(file)s again to %(target)s?"), {
                    file: record.filename || record.file || "",
                    target: record.target || ""
                })],
                function () {
                    self.result(null);
                    self.logLines([]);
                    self.postJson("history/" + record.id + "/reflash", {}, gettext("Re-flash"));
                }
            );
        };
        self.rollback = function (record) {
            self.askConfirm(
                [_.sprintf(gettext("Flash the backup taken before this flash back to %(target)s?"), {
                    target: record.target || ""
                })],
                function () {
                    self.result(null);
                    self.logLines([]);
                    self.postJson("history/" + record.id + "/rollback", {}, gettext("Roll back"));
                }
            );
        };
        self.historyTime = function (r) {
            return F.timeText(r.time);
        };
        self.historyDuration = function (r) {
            return F.duration(r.duration);
        };
        self.historyResultClass = function (r) {
            if (r.result === "unconfirmed") return "text-warning";
            return r.result === "success" ? "text-success" : "text-error";
        };

        // -- lifecycle
        self.syncAll = function () {
            if (!self.mayFlash()) return;
            var m = self.settingValue("method");
            if (m && !self.image()) self.method(m);
            if (self.settingValue("backup_before_flash") !== undefined && !self.image())
                self.backup(!!self.settingValue("backup_before_flash"));
            self.requestStatus();
            self.refreshDevices();
            self.loadHistory();
        };
        self.onStartup = function () {
            self.requestStatus();
        };
        self.onUserLoggedIn = function () {
            self.requestStatus();
        };
        self.onUserPermissionsChanged = function () {
            self.requestStatus();
        };
        self.onSettingsShown = function () {
            self.syncAll();
        };
    }

    OCTOPRINT_VIEWMODELS.push({
        construct: FlasherViewModel,
        dependencies: ["settingsViewModel", "loginStateViewModel", "accessViewModel"],
        elements: ["#settings_plugin_flasher"]
    });
});
