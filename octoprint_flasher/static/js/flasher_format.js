/*
 * Pure formatting and checking helpers of the Firmware Updater page.
 * Kept free of Knockout/jQuery so node can test them (tests/plugin/test_format_js.py).
 */
(function (root, factory) {
    if (typeof module === "object" && module.exports) {
        module.exports = factory();
    } else {
        root.FlasherFormat = factory();
    }
})(typeof self !== "undefined" ? self : this, function () {
    "use strict";

    var EXTENSIONS = [".hex", ".bin", ".dfu", ".uf2"];

    function percent(done, total) {
        if (!total || total <= 0) return 0;
        var p = Math.floor((done * 100) / total);
        return Math.max(0, Math.min(100, p));
    }

    function percentText(p) {
        return Math.round(p || 0) + " %";
    }

    function size(bytes) {
        if (bytes === null || bytes === undefined || isNaN(bytes)) return "";
        if (bytes < 1024) return bytes + " B";
        if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KiB";
        return (bytes / (1024 * 1024)).toFixed(2) + " MiB";
    }

    function rate(bytesPerSecond) {
        if (!bytesPerSecond || bytesPerSecond <= 0) return "";
        return size(Math.round(bytesPerSecond)) + "/s";
    }

    function duration(seconds) {
        if (seconds === null || seconds === undefined || isNaN(seconds) || seconds < 0)
            return "";
        var s = Math.round(seconds);
        var m = Math.floor(s / 60);
        var rest = s % 60;
        if (m >= 60) {
            var h = Math.floor(m / 60);
            m = m % 60;
            return h + ":" + (m < 10 ? "0" : "") + m + ":" + (rest < 10 ? "0" : "") + rest;
        }
        return m + ":" + (rest < 10 ? "0" : "") + rest;
    }

    function hex(address) {
        if (address === null || address === undefined || isNaN(address)) return "";
        var h = Number(address).toString(16).toUpperCase();
        while (h.length < 8) h = "0" + h;
        return "0x" + h;
    }

    function shortHash(sha256) {
        return sha256 ? String(sha256).substring(0, 12) : "";
    }

    function extension(name) {
        var n = String(name || "").toLowerCase();
        var dot = n.lastIndexOf(".");
        return dot >= 0 ? n.substring(dot) : "";
    }

    /* null when the file may be uploaded, else a reason (in English, the caller translates). */
    function checkFile(name, bytes, maxBytes) {
        if (!name) return {code: "none"};
        if (EXTENSIONS.indexOf(extension(name)) < 0) return {code: "type", ext: extension(name)};
        if (!bytes) return {code: "empty"};
        if (maxBytes && bytes > maxBytes) return {code: "size", size: bytes, max: maxBytes};
        return null;
    }

    function deviceLabel(device, printerWord) {
        if (!device) return "";
        var where = device.port || device.usb_path || device.uuid || device.id;
        var parts = [where];
        if (device.description) parts.push(device.description);
        if (device.usb_id && device.usb_id !== "") parts.push("[" + device.usb_id + "]");
        if (device.chip) parts.push(device.chip);
        var label = parts.join(" · ");
        return device.printer ? label + " \u2190 " + (printerWord || "printer") : label;
    }

    /* a UF2 family id as the UF2 spec writes it (0xe48bff56), or "none" */
    function uf2Family(family) {
        if (family === null || family === undefined || isNaN(family)) return "none";
        var h = (Number(family) >>> 0).toString(16);
        while (h.length < 8) h = "0" + h;
        return "0x" + h;
    }

    /* which pass of a two-pass flash a stage belongs to (Prusa MULTILANG: the firmware
       through the bootloader, then the languages through the new firmware): "" when the
       flash has one pass */
    function phase(stage, twoPasses) {
        if (/_languages$/.test(stage || "")) return "languages";
        var firmware = ["entering_bootloader", "erasing", "writing", "verifying"];
        return twoPasses && firmware.indexOf(stage) >= 0 ? "firmware" : "";
    }

    /* a job result as the page shows it: the outcome, the step the flasher asks of the user
       after a success (its leave() sentence: choose a language on the printer, reconnect the
       printer so it sees the MMU) on a line of its own, and whether only the firmware pass of
       two succeeded (a Prusa language pass that failed: the printer runs, in English) */
    function outcome(r) {
        var error = r.error || {};
        var state = r.status || r.result;
        var ok = state === "success" || r.ok === true;
        var message = r.message || error.message || "";
        var next = ok && r.board_message ? r.board_message : "";
        if (next && message.indexOf(next) >= 0) message = message.replace(next, "").trim();
        return {ok: ok, partial: !ok && error.kind === "languages", message: message, next: next};
    }

    function timeText(value) {
        if (!value) return "";
        var d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
        if (isNaN(d.getTime())) return String(value);
        function two(n) {
            return (n < 10 ? "0" : "") + n;
        }
        return (
            d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
            two(d.getHours()) + ":" + two(d.getMinutes())
        );
    }

    return {
        EXTENSIONS: EXTENSIONS,
        percent: percent,
        percentText: percentText,
        size: size,
        rate: rate,
        duration: duration,
        hex: hex,
        shortHash: shortHash,
        extension: extension,
        checkFile: checkFile,
        deviceLabel: deviceLabel,
        phase: phase,
        outcome: outcome,
        uf2Family: uf2Family,
        timeText: timeText
    };
});
