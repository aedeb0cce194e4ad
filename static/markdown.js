/* SmartEdu Tutor Chat: a small Markdown renderer that builds DOM nodes only.
 *
 * Untrusted text never reaches innerHTML: every piece of text becomes a Text node or an element's
 * textContent, so HTML in an answer is shown as text. Links keep only absolute http(s) URLs.
 * Supported: paragraphs, headings, bold/italic/strike, inline code, fenced code, block quotes,
 * (nested) lists, tables, horizontal rules, links and autolinks, and TeX math shown as code-styled text.
 * It is tolerant of half-written input, because answers are re-rendered while they stream.
 */
(function () {
  'use strict';

  var MAX_DEPTH = 8;
  var FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  var HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
  var RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  var QUOTE = /^ {0,3}> ?/;
  var ITEM = /^( *)([-*+]|\d{1,9}[.)])([ \t]+|$)(.*)$/;
  var TABLE_SEP = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;
  var MATH_OPEN = /^ {0,3}(\$\$|\\\[)/;
  var LINK = /^\[((?:[^\[\]\\]|\\.)*)\]\(\s*(<[^>]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)(?:\s+"[^"]*")?\s*\)/;
  var RUNS = { '*': /^\*+/, _: /^_+/, '~': /^~+/ };
  var ESCAPABLE = '\\`*_{}[]()#+-.!|~$<>';

  function el(tag, className) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function blank(line) {
    return /^\s*$/.test(line);
  }

  function indentOf(line) {
    var m = /^ */.exec(line.replace(/\t/g, '    '));
    return m ? m[0].length : 0;
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      MATH_OPEN.test(line) || /^ {0,3}([-*+]|1[.)])[ \t]+\S/.test(line);
  }

  function isTableStart(lines, i) {
    return i + 1 < lines.length && lines[i].indexOf('|') >= 0 && lines[i + 1].indexOf('-') >= 0 &&
      lines[i + 1].indexOf('|') >= 0 && TABLE_SEP.test(lines[i + 1]);
  }

  // Whether line i goes on the paragraph the line before it is in.
  function continues(lines, i) {
    return !blank(lines[i]) && !startsBlock(lines[i]) && !isTableStart(lines, i);
  }

  /* ---- inline ---------------------------------------------------------------------------------- */

  function safeUrl(raw) {
    var url = raw.trim().replace(/^<|>$/g, '');
    if (!/^https?:\/\//i.test(url)) return null;
    try {
      var parsed = new URL(url);
      return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? parsed.href : null;
    } catch (e) {
      return null;
    }
  }

  function link(href, parent) {
    var a = el('a');
    a.href = href;
    a.rel = 'noopener noreferrer nofollow';
    a.target = '_blank';
    parent.appendChild(a);
    return a;
  }

  function mathNode(tex, display) {
    var code = el('code', display ? 'se-math se-math--display' : 'se-math');
    code.textContent = tex;
    return code;
  }

  // Index of the closing delimiter `delim` at or after `from`, not preceded by whitespace.
  function closing(text, delim, from) {
    var j = text.indexOf(delim, from);
    while (j >= 0) {
      if (!/\s/.test(text.charAt(j - 1)) && text.charAt(j - 1) !== '\\') {
        if (delim.charAt(0) !== '_' || !/[A-Za-z0-9]/.test(text.charAt(j + delim.length))) return j;
      }
      j = text.indexOf(delim, j + 1);
    }
    return -1;
  }

  function inline(text, parent, depth) {
    var buf = '';
    var i = 0;
    // Delimiters with no closer after some point have none after any later point either: remembering
    // that keeps input like "_a _a _a ..." linear instead of quadratic.
    var unclosed = {};
    // The end of a run that failed as a URL: an "http" inside it stays text too, rather than being
    // scanned to the same end again (quadratic on "http://[" repeated).
    var plainUntil = 0;
    function flush() {
      if (buf) {
        parent.appendChild(document.createTextNode(buf));
        buf = '';
      }
    }
    while (i < text.length) {
      var c = text.charAt(i);
      var next = text.charAt(i + 1);
      var rest, m, j, run, node;

      if (c === '\\') {
        if (next === '(' || next === '[') {
          var closer = next === '(' ? '\\)' : '\\]';
          j = unclosed[closer] ? -1 : text.indexOf(closer, i + 2);
          if (j < 0) unclosed[closer] = true;
          if (j > i + 2) {
            flush();
            parent.appendChild(mathNode(text.slice(i + 2, j), next === '['));
            i = j + 2;
            continue;
          }
        }
        if (next && ESCAPABLE.indexOf(next) >= 0) {
          buf += next;
          i += 2;
          continue;
        }
      }

      if (c === '`') {
        run = /^`+/.exec(text.slice(i, i + 50))[0];
        j = unclosed[run] ? -1 : text.indexOf(run, i + run.length);
        while (j >= 0 && text.charAt(j + run.length) === '`') j = text.indexOf(run, j + run.length + 1);
        if (j < 0) unclosed[run] = true;
        if (j >= 0) {
          flush();
          node = el('code');
          var inner = text.slice(i + run.length, j);
          node.textContent = /^ .*[^ ].* $/.test(inner) ? inner.slice(1, -1) : inner;
          parent.appendChild(node);
          i = j + run.length;
          continue;
        }
        buf += run;
        i += run.length;
        continue;
      }

      if (c === '$') {
        if (next === '$') {
          j = text.indexOf('$$', i + 2);
          if (j > i + 2) {
            flush();
            parent.appendChild(mathNode(text.slice(i + 2, j).trim(), true));
            i = j + 2;
            continue;
          }
        } else if (next && !/\s/.test(next)) {
          // $x$ but not "$5 and $10": the closing $ follows a non-space and no digit follows it.
          j = i + 1;
          while ((j = text.indexOf('$', j + 1)) >= 0) {
            if (text.charAt(j - 1) !== '\\') break;
          }
          if (j > i + 1 && !/\s/.test(text.charAt(j - 1)) && !/[0-9]/.test(text.charAt(j + 1))) {
            flush();
            parent.appendChild(mathNode(text.slice(i + 1, j), false));
            i = j + 1;
            continue;
          }
        }
      }

      if ((c === '*' || c === '_' || c === '~') && depth < MAX_DEPTH) {
        run = RUNS[c].exec(text.slice(i, i + 50))[0];
        var leftOk = c !== '_' || !/[A-Za-z0-9]/.test(text.charAt(i - 1));
        var size = c === '~' ? (run.length >= 2 ? 2 : 0) : Math.min(run.length, 3);
        if (size && leftOk && text.charAt(i + size) && !/\s/.test(text.charAt(i + size))) {
          var delim = run.slice(0, size);
          j = unclosed[delim] ? -1 : closing(text, delim, i + size + 1);
          if (j < 0) unclosed[delim] = true;
          if (j > i + size - 1) {
            flush();
            if (c === '~') {
              node = el('del');
            } else if (size === 3) {
              node = el('strong');
              var em = el('em');
              node.appendChild(em);
              inline(text.slice(i + 3, j), em, depth + 1);
              parent.appendChild(node);
              i = j + 3;
              continue;
            } else {
              node = el(size === 2 ? 'strong' : 'em');
            }
            inline(text.slice(i + size, j), node, depth + 1);
            parent.appendChild(node);
            i = j + size;
            continue;
          }
        }
        buf += run;
        i += run.length;
        continue;
      }

      if ((c === '[' || c === '!' && next === '[') && depth < MAX_DEPTH) {
        // Images are never loaded (no tracking pixels; img-src stays 'self'): ![alt](url) becomes a link.
        rest = text.slice(c === '!' ? i + 1 : i);
        m = LINK.exec(rest);
        if (m) {
          if (c === '!') i += 1;
          flush();
          var href = safeUrl(m[2]);
          if (href) {
            inline(m[1] || href, link(href, parent), depth + 1);
          } else {
            inline(m[1], parent, depth + 1);
          }
          i += m[0].length;
          continue;
        }
      }

      if ((c === 'h' || c === 'H') && i >= plainUntil && !/[A-Za-z0-9]/.test(text.charAt(i - 1))) {
        m = /^https?:\/\/[^\s<>"]*[^\s<>"'.,;:!?)\]]/i.exec(text.slice(i));
        if (m) {
          var url = safeUrl(m[0]);
          if (url) {
            flush();
            link(url, parent).textContent = m[0];
            i += m[0].length;
            continue;
          }
          plainUntil = i + m[0].length;
        }
      }

      buf += c;
      i += 1;
    }
    flush();
  }

  // Line `k` (from 0) of a paragraph.
  function inlineLine(line, k, parent, depth) {
    if (k) parent.appendChild(el('br'));
    // A trailing backslash or two spaces mean a hard break in Markdown; a <br> is used anyway.
    inline(line.replace(/(\\| {2,})$/, '').trim(), parent, depth);
  }

  function inlineLines(lines, parent, depth) {
    for (var k = 0; k < lines.length; k++) inlineLine(lines[k], k, parent, depth);
  }

  /* ---- blocks ---------------------------------------------------------------------------------- */

  function splitRow(line) {
    var cells = [];
    var cur = '';
    var body = line.trim().replace(/^\|/, '');
    if (/[^\\]\|$/.test(body) || body === '|') body = body.slice(0, -1);
    for (var i = 0; i < body.length; i++) {
      var ch = body.charAt(i);
      if (ch === '\\' && body.charAt(i + 1) === '|') {
        cur += '|';
        i += 1;
      } else if (ch === '|') {
        cells.push(cur.trim());
        cur = '';
      } else {
        cur += ch;
      }
    }
    cells.push(cur.trim());
    return cells;
  }

  function table(lines, i, parent, depth) {
    var head = splitRow(lines[i]);
    var aligns = splitRow(lines[i + 1]).map(function (spec) {
      var left = spec.charAt(0) === ':';
      var right = spec.charAt(spec.length - 1) === ':';
      return left && right ? 'center' : right ? 'right' : left ? 'left' : '';
    });
    var wrap = el('div', 'se-table');
    var tbl = el('table');
    var thead = el('thead');
    var tr = el('tr');
    head.forEach(function (cell, k) {
      var th = el('th', aligns[k] ? 'se-al-' + aligns[k] : '');
      th.scope = 'col';
      inline(cell, th, depth + 1);
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    tbl.appendChild(thead);
    var tbody = el('tbody');
    i += 2;
    while (i < lines.length && !blank(lines[i]) && lines[i].indexOf('|') >= 0) {
      var row = splitRow(lines[i]);
      tr = el('tr');
      for (var k = 0; k < head.length; k++) {
        var td = el('td', aligns[k] ? 'se-al-' + aligns[k] : '');
        inline(row[k] || '', td, depth + 1);
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
      i += 1;
    }
    tbl.appendChild(tbody);
    wrap.appendChild(tbl);
    parent.appendChild(wrap);
    return i;
  }

  function list(lines, i, parent, depth) {
    var first = ITEM.exec(lines[i]);
    var baseIndent = first[1].length;
    var ordered = /\d/.test(first[2]);
    var marker = first[2].slice(-1);
    var listEl = el(ordered ? 'ol' : 'ul');
    if (ordered) {
      var start = parseInt(first[2], 10);
      if (start !== 1) listEl.start = start;
    }
    while (i < lines.length) {
      var m = ITEM.exec(lines[i]);
      if (!m || m[1].length > baseIndent + 1 || m[1].length + 1 < baseIndent) break;
      if (/\d/.test(m[2]) !== ordered || m[2].slice(-1) !== marker) break;
      var contentIndent = m[1].length + m[2].length + Math.max(1, Math.min(m[3].length, 4));
      var body = [m[4]];
      i += 1;
      while (i < lines.length) {
        var line = lines[i];
        if (blank(line)) {
          var k = i + 1;
          while (k < lines.length && blank(lines[k])) k++;
          if (k < lines.length && indentOf(lines[k]) >= contentIndent) {
            for (; i < k; i++) body.push('');
            continue;
          }
          break;
        }
        var ind = indentOf(line);
        if (ind >= contentIndent) {
          body.push(line.replace(/\t/g, '    ').slice(contentIndent));
        } else if (ITEM.test(line) || startsBlock(line)) {
          break;
        } else {
          body.push(line.trim());
        }
        i += 1;
      }
      var li = el('li');
      blocks(body, li, depth + 1);
      listEl.appendChild(li);
      // A blank line between items of the same list keeps the list going.
      var n = i;
      while (n < lines.length && blank(lines[n])) n++;
      if (n > i && n < lines.length && ITEM.test(lines[n]) && ITEM.exec(lines[n])[1].length <= baseIndent + 1) {
        i = n;
      }
    }
    parent.appendChild(listEl);
    return i;
  }

  // `starts`, when given, collects {line, child: child count of parent} at each block's first line, with
  // `fence` for a fenced code block left open at the end: {code (its element), close (its closing line)},
  // and `para` for a paragraph: {p (its element), lines (how many)}.
  function blocks(lines, parent, depth, starts) {
    var i = 0;
    var m;
    if (depth > MAX_DEPTH) {
      var p0 = el('p');
      p0.textContent = lines.join('\n');
      parent.appendChild(p0);
      return;
    }
    while (i < lines.length) {
      var line = lines[i];
      if (blank(line)) {
        i += 1;
        continue;
      }
      var start = starts ? { line: i, child: parent.childNodes.length } : null;
      if (start) starts.push(start);
      if ((m = FENCE.exec(line))) {
        var fence = m[1];
        var close = new RegExp('^ {0,3}' + fence.charAt(0) + '{' + fence.length + ',}\\s*$');
        var code = [];
        var closed = false;
        i += 1;
        while (i < lines.length && !closed) {
          closed = close.test(lines[i]);
          if (!closed) code.push(lines[i]);
          i += 1;
        }
        var pre = el('pre');
        var codeEl = el('code');
        if (m[2]) {
          pre.setAttribute('data-lang', m[2].slice(0, 20));
          codeEl.className = 'se-lang-' + m[2].replace(/[^\w-]/g, '').slice(0, 20);
        }
        codeEl.textContent = code.join('\n');
        pre.appendChild(codeEl);
        parent.appendChild(pre);
        if (start && !closed) start.fence = { code: codeEl, close: close };
        continue;
      }
      if ((m = MATH_OPEN.exec(line))) {
        var closer = m[1] === '$$' ? '$$' : '\\]';
        var after = line.replace(MATH_OPEN, '');
        var tex = [];
        var endAt = after.indexOf(closer);
        if (endAt >= 0) {
          tex.push(after.slice(0, endAt));
          i += 1;
        } else {
          if (after.trim()) tex.push(after);
          i += 1;
          while (i < lines.length) {
            endAt = lines[i].indexOf(closer);
            if (endAt >= 0) {
              if (lines[i].slice(0, endAt).trim()) tex.push(lines[i].slice(0, endAt));
              i += 1;
              break;
            }
            tex.push(lines[i]);
            i += 1;
          }
        }
        var block = el('pre', 'se-math-block');
        block.appendChild(mathNode(tex.join('\n').trim(), true));
        parent.appendChild(block);
        continue;
      }
      if ((m = HEADING.exec(line))) {
        var h = el('h' + Math.min(6, m[1].length + 2), 'se-h');
        inline(m[2], h, depth);
        parent.appendChild(h);
        i += 1;
        continue;
      }
      if (RULE.test(line)) {
        parent.appendChild(el('hr'));
        i += 1;
        continue;
      }
      if (QUOTE.test(line)) {
        var quoted = [];
        while (i < lines.length && !blank(lines[i]) && (QUOTE.test(lines[i]) || !startsBlock(lines[i]))) {
          quoted.push(lines[i].replace(QUOTE, ''));
          i += 1;
        }
        var bq = el('blockquote');
        blocks(quoted, bq, depth + 1);
        parent.appendChild(bq);
        continue;
      }
      if (ITEM.test(line) && (m = ITEM.exec(line)) && m[4].trim() !== '' || /^ *[-*+]\s*$/.test(line) && i + 1 < lines.length && indentOf(lines[i + 1]) > 1) {
        i = list(lines, i, parent, depth);
        continue;
      }
      if (isTableStart(lines, i)) {
        i = table(lines, i, parent, depth);
        continue;
      }
      var para = [line];
      i += 1;
      while (i < lines.length && continues(lines, i)) {
        para.push(lines[i]);
        i += 1;
      }
      var p = el('p');
      inlineLines(para, p, depth);
      parent.appendChild(p);
      if (start) start.para = { p: p, lines: para.length };
    }
  }

  var stats = { parsed: 0 }; // characters of Markdown parsed so far: what a test counts per render

  function parse(source, parent, starts) {
    stats.parsed += source.length;
    var lines = source.replace(/\r\n?/g, '\n').split('\n');
    blocks(lines, parent, 0, starts);
    return lines;
  }

  /** Render Markdown `source` into a new DocumentFragment (text only ever becomes Text nodes). */
  function renderMarkdown(source) {
    var fragment = document.createDocumentFragment();
    parse(String(source == null ? '' : source), fragment);
    return fragment;
  }

  /* ---- streaming ------------------------------------------------------------------------------- */

  var BREAK = /\r\n?|\n/g;

  // Where line `n` (from 0) of `text` starts.
  function lineStart(text, n) {
    BREAK.lastIndex = 0;
    for (var k = 0; k < n; k++) BREAK.exec(text);
    return BREAK.lastIndex;
  }

  // An open fenced code block at the end of a growing answer takes only the new text: its lines are code
  // until the closing line, so each complete line is read once (is it the closing one?) and the code's
  // text is what came before plus the line being written. `f.from` is where that line starts in the
  // source and `f.done` the code's complete lines, each with its "\n". Returns -1 while the block stays
  // open, else where the line after its closing line starts. A "\r" ending the source may be the first
  // half of "\r\n": that line is not complete yet.
  function growFence(f, source, grownFrom) {
    var at = f.from;
    BREAK.lastIndex = Math.max(at, grownFrom - 1); // nothing before it ended a line
    var br;
    while ((br = BREAK.exec(source)) && (br[0] !== '\r' || br.index < source.length - 1)) {
      var line = source.slice(at, br.index);
      stats.parsed += BREAK.lastIndex - Math.max(at, grownFrom);
      if (f.close.test(line)) {
        f.code.textContent = f.done.slice(0, -1);
        return BREAK.lastIndex;
      }
      f.done += line + '\n';
      at = BREAK.lastIndex;
    }
    f.from = at;
    var partial = source.slice(at).replace(/\r$/, '');
    var crlf = partial.length < source.length - at; // a line break, maybe the first half of one
    stats.parsed += source.length - Math.max(at, grownFrom);
    // Only a line that starts as a fence's can be its closing line (and is read whole only then).
    var closing = /^ {0,3}[`~]/.test(partial) && f.close.test(partial);
    if (closing) stats.parsed += partial.length;
    f.code.textContent = closing ? f.done.slice(0, -1) : f.done + partial + (crlf ? '\n' : '');
    return -1;
  }

  // An open paragraph at the end takes its new lines alone: a line's nodes depend on that line only, and
  // whether a line is the paragraph's on it and the line after it (which can make it a table's header).
  // So a line is built for good once the two after it are complete, and only the last three lines (and
  // what arrived) are read again. `t.from` is where the first line not built for good starts, `t.count`
  // how many are, `t.keep` the paragraph's child count after them, and `t.after` the nodes of the lines
  // after the paragraph as a full render reads them now. Returns -1 while the paragraph stays open,
  // else where the line after it starts. (A paragraph of one long line is still read whole each time.)
  function growPara(t, source) {
    var p = t.p;
    while (p.childNodes.length > t.keep) p.removeChild(p.lastChild);
    t.after.forEach(function (node) { node.parentNode.removeChild(node); });
    t.after = [];
    stats.parsed += source.length - t.from;
    var lines = source.slice(t.from).replace(/\r\n?/g, '\n').split('\n');
    var k = 0;
    while (k + 3 < lines.length) {
      inlineLine(lines[k], t.count++, p, 0);
      t.keep = p.childNodes.length;
      BREAK.lastIndex = t.from + lines[k].length;
      BREAK.exec(source);
      t.from = BREAK.lastIndex;
      k += 1;
      if (!continues(lines, k)) return t.from;
    }
    var n = t.count;
    for (var j = k; j < lines.length && (j === k || continues(lines, j)); j++) inlineLine(lines[j], n++, p, 0);
    if (j < lines.length) {
      var fragment = document.createDocumentFragment();
      blocks(lines.slice(j), fragment, 0);
      t.after = Array.prototype.slice.call(fragment.childNodes);
      p.parentNode.appendChild(fragment);
    }
    return -1;
  }

  // An answer that streams grows at its end, and rendering all of it again on every frame cost O(n^2)
  // over the answer (seconds of jank for 50 KB). A top-level block that follows a blank line starts where
  // nothing before it can change any more, once that block's first line is complete: every block before
  // it has ended by then (a list is the one that looks past a blank line, and only at that first line).
  // What precedes the last such start is built once; each render parses only the text after it. The
  // result is the DOM renderMarkdown makes of the whole text, whatever the chunks were. A fenced code
  // block or a paragraph open at the end grows by its new text (growFence, growPara) once its first two
  // lines are complete: where the blocks before it end depends on no line after those two. Once it ends,
  // it and all before it are final: one 50 KB code block is not parsed again each frame.
  function MarkdownStream(container) {
    this.container = container;
    this.source = '';
    this.settled = 0; // characters of `source` whose nodes are final
    this.open = []; // the nodes of the text after them, rebuilt on each render
    this.tail = null; // the fenced code block or paragraph open at the end, as growFence or growPara take it
  }

  /** Show Markdown `source` in the container: only the text after the settled blocks is parsed when
   * `source` extends what was shown; anything else is rendered anew. */
  MarkdownStream.prototype.render = function (source) {
    source = String(source == null ? '' : source);
    if (source === this.source) return;
    var container = this.container;
    var tail = this.tail;
    this.tail = null;
    var grown = this.source.length;
    if (tail && source.length > grown && source.slice(0, grown) === this.source) {
      this.source = source;
      var end = tail.p ? growPara(tail, source) : growFence(tail, source, grown);
      if (end < 0) {
        this.tail = tail;
        return;
      }
      this.settled = end; // it ended: it and everything before it are final
      this.open = [];
    } else if (source.slice(0, this.settled) !== this.source.slice(0, this.settled)) {
      this.settled = 0;
      container.textContent = '';
    } else {
      this.open.concat(tail && tail.after || []).forEach(function (node) { container.removeChild(node); });
    }
    this.source = source;
    var from = this.settled;
    var rest = source.slice(from);
    var starts = [];
    var fragment = document.createDocumentFragment();
    var lines = parse(rest, fragment, starts);
    var keep = 0;
    var line = 0;
    for (var k = starts.length - 1; k >= 0; k--) {
      line = starts[k].line;
      if (line > 0 && line < lines.length - 1 && blank(lines[line - 1])) {
        keep = starts[k].child;
        break;
      }
    }
    if (keep) this.settled += lineStart(rest, line);
    var nodes = Array.prototype.slice.call(fragment.childNodes);
    this.open = nodes.slice(keep);
    container.appendChild(fragment);
    var last = starts[starts.length - 1];
    // Its first two lines complete (and no "\r" at the end that may be half of "\r\n"): the block's kind
    // and what came before it are settled, and it grows from here.
    if (!last || last.line + 1 >= lines.length - 1 || /\r$/.test(source)) return;
    var ends = last.para && last.line + last.para.lines;
    if (last.fence) {
      tail = last.fence;
      tail.from = from + lineStart(rest, last.line + 1);
      tail.done = '';
      tail.after = [];
      growFence(tail, source, tail.from); // reads the code so far: a line or two, so soon after it began
      this.tail = tail;
    } else if (ends === lines.length || ends === lines.length - 1 && blank(lines[ends])) {
      tail = { p: last.para.p, from: from + lineStart(rest, last.line), count: 0, keep: 0, after: [] };
      growPara(tail, source);
      this.tail = tail;
    }
  };

  var ns = (window.SmartEdu = window.SmartEdu || {});
  ns.renderMarkdown = renderMarkdown;
  ns.MarkdownStream = MarkdownStream;
  ns.markdownStats = stats;
})();
